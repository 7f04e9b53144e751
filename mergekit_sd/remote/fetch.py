"""Downloading a model input by URL (https, http or s3) into a models folder, verified by its sha256 pin.

The download goes to a hidden `.NAME.part` file beside the target and resumes from its length with an HTTP Range
request (after a dropped connection, or in the next run); the file is renamed into place only once its sha256 is
the pin, and a mismatch deletes it. Redirects are followed only to http(s) URLs, and a name that would leave the
folder is refused, so nothing a URL or a recipe says can write anywhere but the folder the user named.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urljoin, urlparse

from mergekit_sd.errors import UserError
from mergekit_sd.formats.atomic import fsync_dir
from mergekit_sd.recipe.load import check_url

CHUNK = 1 << 20
ATTEMPTS = 4


def safe_name(name: str, url: str) -> str:
    """A plain file name, or an error: a name with separators or `..` would leave the models folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise UserError(f"refusing to download {url}: its file name {name!r} would not stay inside the models folder")
    return name


def name_from_url(url: str) -> str:
    return unquote(PurePosixPath(urlparse(url).path).name) if urlparse(url).path else ""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: never to file:, ftp: or anything else a server names."""

    def http_error_302(self, req, fp, code, msg, headers):
        newurl = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if urlparse(newurl).scheme not in ("http", "https"):
            raise UserError(f"refusing to follow a redirect from {req.full_url} to {newurl} (only http and https are followed)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, folder: Path, name: str, sha256: str, on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
    """Download `url` to `folder/name` unless a file with that sha256 is already there; returns the path."""
    check_url(url, "url")
    name = safe_name(name, url)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if os.path.commonpath([os.path.realpath(folder), os.path.realpath(target)]) != os.path.realpath(folder):
        raise UserError(f"refusing to download {url}: {target} resolves outside {folder}")
    if target.is_file() and sha256_of(target) == sha256:
        return target
    part = folder / f".{name}.part"
    if urlparse(url).scheme == "s3":
        _fetch_s3(url, part)
    else:
        _fetch_http(url, part, on_bytes)
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise UserError(f"{url}: downloaded file has sha256 {got}, but the recipe pins {sha256}; the download was deleted")
    os.replace(part, target)
    fsync_dir(folder)
    return target


def _fetch_http(url: str, part: Path, on_bytes: Callable[[int, int | None], None] | None) -> None:
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with _OPENER.open(req, timeout=60) as resp:
                status = resp.status
                if have and status != 206:  # the server ignored the range: start over
                    have = 0
                total = resp.headers.get("Content-Length")
                total_n = int(total) + have if total is not None else None
                with open(part, "ab" if have else "wb") as f:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        have += len(block)
                        if on_bytes is not None:
                            on_bytes(have, total_n)
                    f.flush()
                    os.fsync(f.fileno())
            if total_n is None or have >= total_n:
                return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: what we have is everything
                return
            if e.code < 500:
                raise UserError(f"{url}: HTTP {e.code} {e.reason}; check the URL") from None
            err: BaseException = e
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            err = e
        else:
            err = ConnectionError("connection closed before the end of the file")
        if attempt + 1 < ATTEMPTS:
            time.sleep(min(2.0, 0.2 * 2 ** attempt))
    reason = getattr(err, "reason", None) or err
    raise UserError(f"{url}: download interrupted ({reason}); {part.stat().st_size if part.exists() else 0} bytes kept, "
                    "run the same command again to resume")


def _fetch_s3(url: str, part: Path) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from mergekit_sd.remote.s3 import s3_client

    u = urlparse(url)
    try:
        s3_client().download_file(u.netloc, u.path.lstrip("/"), str(part))
    except ClientError as e:
        if part.exists():
            part.unlink()
        raise UserError(f"{url}: {e.response.get('Error', {}).get('Code', 'error')}; check the URL and your credentials") from None
    except BotoCoreError as e:
        raise UserError(f"{url}: {e}") from None
