"""A remote object cache in any S3-compatible store (AWS, MinIO, R2, Ceph).

Objects live at `<prefix>/objects/ab/<key>.safetensors`, exactly as in the local store, so a remote is a second
local store that many machines share. Downloads land in a temporary file that the caller verifies before adopting
it; uploads use boto3's managed transfer (multipart above 64 MiB), whose completion is atomic, so a half upload is
never visible under a real key. Every failure of the remote itself (unreachable, refused, throttled past the
retries) is raised as `RemoteUnavailable`, which the engine turns into one warning and a local build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from mergekit_sd.errors import UserError

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
MULTIPART_THRESHOLD = 64 << 20


class RemoteUnavailable(Exception):
    """The remote could not be reached or refused the request (not: the object is missing)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str, where: str = "--remote") -> "S3Location":
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise UserError(f"{url!r} is not an S3 location; use s3://bucket/prefix", where)
        return cls(u.netloc, u.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join([p for p in (self.prefix, *parts) if p])


def s3_client(endpoint: str | None = None):
    """A boto3 client with path-style addressing and retries with backoff; credentials from the standard chain."""
    import boto3
    from botocore.config import Config

    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 4, "mode": "standard"},
                 connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint or os.environ.get(ENDPOINT_ENV) or None, config=cfg)


def _unavailable(e: BaseException) -> RemoteUnavailable:
    return RemoteUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


class RemoteStore:
    """The objects of one cache prefix in a bucket."""

    def __init__(self, url: str, endpoint: str | None = None, read_only: bool = False):
        self.url = url
        self.location = S3Location.parse(url)
        self.read_only = read_only
        self._endpoint = endpoint
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self._endpoint)
        return self._client

    def object_key(self, key: str) -> str:
        return self.location.key("objects", key[:2], f"{key}.safetensors")

    def _call(self, fn: Callable, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _unavailable(e) from None
        except (BotoCoreError, OSError) as e:
            raise _unavailable(e) from None

    def size(self, key: str) -> int | None:
        """The object's size if the remote has it (HEAD), else None."""
        r = self._call(self.client.head_object, Bucket=self.location.bucket, Key=self.object_key(key))
        return None if r is None else int(r["ContentLength"])

    def download(self, key: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> bool:
        """Fetch an object into `dest` (a temporary path the caller verifies); False when the remote lacks it."""
        if self.size(key) is None:
            return False
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)
        self._call(self.client.download_file, self.location.bucket, self.object_key(key), str(dest), Config=cfg,
                   Callback=on_bytes)
        return dest.exists()

    def upload(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Put a local object under its key (multipart above 64 MiB; completion is atomic)."""
        if self.read_only:
            raise RuntimeError("a read-only remote never writes")
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)
        self._call(self.client.upload_file, str(path), self.location.bucket, self.object_key(key), Config=cfg,
                   Callback=on_bytes)
