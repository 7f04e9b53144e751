"""A shared S3 cache (a real S3 endpoint served by moto on 127.0.0.1) and inputs fetched by URL (a local HTTP
server): results are shared, checked on download, never poisoned by read-only clients, and downloads are verified
and confined to the models folder."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import write_recipe
from mergekit_sd.synth.models import write_synth

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
from werkzeug.serving import make_server  # noqa: E402  (moto's server dependency)

BUCKET = "team-cache"


class S3Server:
    """moto's S3 on 127.0.0.1, port 0, counting requests by method."""

    def __init__(self):
        app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
        self.methods: list[str] = []

        def counting(environ, start_response):
            self.methods.append(environ["REQUEST_METHOD"])
            return app(environ, start_response)

        self.httpd = make_server("127.0.0.1", 0, counting, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def s3(monkeypatch):
    server = S3Server()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": server.url}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    urllib.request.urlopen(urllib.request.Request(server.url + "/moto-api/reset", method="POST"), timeout=10).read()
    client = boto3.client("s3", endpoint_url=server.url)
    client.create_bucket(Bucket=BUCKET)
    server.client = client
    yield server
    server.stop()


def _recipe(folder: Path) -> Path:
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_synth(folder / f"{name}.safetensors", "sd1", 64, "fp16", seed)
    return write_recipe(folder, """
        sdbuild: 1
        inputs: {a: a.safetensors, b: b.safetensors, c: c.safetensors}
        steps:
          ab:   {op: weighted_sum, models: [a, b], alpha: 0.3}
          top:  {op: add_difference, models: [ab, c, a], alpha: 0.5}
        outputs: {top: out/top.safetensors, ab: out/ab.safetensors}
        """)


def _objects(s3) -> dict[str, int]:
    listed = s3.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: o["Size"] for o in listed}


def _build(sdbuild, rec: Path, cache: Path, *extra: str):
    r = sdbuild("build", rec, "--json", "--cache-dir", cache, "--remote", f"s3://{BUCKET}/sd", *extra)
    return r, (json.loads(r.out) if r.code == 0 else None)


def test_two_caches_share_one_bucket_and_the_second_computes_nothing(tmp_path, sdbuild, s3):
    rec = _recipe(tmp_path)
    r, first = _build(sdbuild, rec, tmp_path / "cache1")
    assert r.code == 0, r
    assert {n: s["source"] for n, s in first["steps"].items()} == {"ab": "computed", "top": "computed"}
    keys = _objects(s3)
    assert len(keys) == 2 and all(k.startswith("sd/objects/") and k.endswith(".safetensors") for k in keys)
    built = {n: (tmp_path / "out" / f"{n}.safetensors").read_bytes() for n in ("ab", "top")}
    for n in ("ab", "top"):
        (tmp_path / "out" / f"{n}.safetensors").unlink()
    r, second = _build(sdbuild, rec, tmp_path / "cache2")
    assert r.code == 0, r
    assert {n: s["source"] for n, s in second["steps"].items()} == {"ab": "remote", "top": "remote"}
    assert sorted(second["built"]) == ["ab", "top"]
    assert {n: (tmp_path / "out" / f"{n}.safetensors").read_bytes() for n in ("ab", "top")} == built
    puts_before = s3.methods.count("PUT")
    r, third = _build(sdbuild, rec, tmp_path / "cache3", "--remote-read-only")
    assert r.code == 0 and s3.methods.count("PUT") == puts_before  # read-only: not a single PUT


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other step"])
def test_a_damaged_remote_object_is_rebuilt_locally_and_never_served(tmp_path, sdbuild, s3, damage):
    rec = _recipe(tmp_path)
    assert _build(sdbuild, rec, tmp_path / "cache1")[0].code == 0
    good = (tmp_path / "out" / "top.safetensors").read_bytes()
    keys = sorted(_objects(s3))
    ab_key = next(k for k in keys if json.loads(_meta(s3, k)["sdbuild.provenance"])["node"] == "ab")
    top_key = next(k for k in keys if k != ab_key)
    body = s3.client.get_object(Bucket=BUCKET, Key=top_key)["Body"].read()
    bad = {"garbage": b"\x00" * 64 + b"not a model" * 100, "truncated": body[: len(body) // 2],
           "other step": s3.client.get_object(Bucket=BUCKET, Key=ab_key)["Body"].read()}[damage]
    s3.client.put_object(Bucket=BUCKET, Key=top_key, Body=bad)
    (tmp_path / "out" / "top.safetensors").unlink()
    r, rep = _build(sdbuild, rec, tmp_path / "cache2", "--remote-read-only")
    assert r.code == 0, r
    assert rep["steps"]["ab"]["source"] == "remote" and rep["steps"]["top"]["source"] == "computed"
    assert (rep["steps"]["ab"]["computed"], rep["steps"]["ab"]["reused"]) == (0, 0)  # downloaded: nothing made here
    assert "failed verification" in r.err and r.err.count("warning:") == 1
    assert (tmp_path / "out" / "top.safetensors").read_bytes() == good


def _meta(s3, key: str) -> dict:
    body = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + n])["__metadata__"]


def test_the_server_stopping_mid_build_is_one_warning_and_a_local_build(tmp_path, sdbuild, s3, monkeypatch):
    rec = _recipe(tmp_path)
    from mergekit_sd.engine import runner

    real = runner.Runner._run_step
    calls = []

    def stop_after_first(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 1:
            s3.stop()
        return out

    monkeypatch.setattr(runner.Runner, "_run_step", stop_after_first)
    r = sdbuild("build", rec, "--cache-dir", tmp_path / "cache1", "--remote", f"s3://{BUCKET}/sd")
    assert r.code == 0, r
    assert len(calls) == 2 and r.err.count("warning:") == 1 and "unavailable" in r.err
    assert (tmp_path / "out" / "top.safetensors").exists()


def test_an_unreachable_remote_is_a_warning_not_a_failure(tmp_path, sdbuild, monkeypatch):
    rec = _recipe(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    r = sdbuild("build", rec, "--remote", "s3://nowhere/x", "--remote-endpoint", "http://127.0.0.1:9")
    assert r.code == 0, r
    assert r.err.count("warning:") == 1 and "s3://nowhere/x unavailable" in r.err


def test_push_then_pull_materialises_outputs_without_computing(tmp_path, sdbuild, s3):
    rec = _recipe(tmp_path)
    assert sdbuild("build", rec, "-q", "--cache-dir", tmp_path / "cache1").code == 0
    good = (tmp_path / "out" / "top.safetensors").read_bytes()
    assert _objects(s3) == {}
    r = sdbuild("push", rec, "--json", "--cache-dir", tmp_path / "cache1", "--remote", f"s3://{BUCKET}/sd")
    assert r.code == 0, r
    pushed = json.loads(r.out)
    assert pushed["uploaded"] == 2 and pushed["bytes"] == sum(_objects(s3).values()) and pushed["not_built"] == []
    r = sdbuild("push", rec, "--json", "--cache-dir", tmp_path / "cache1", "--remote", f"s3://{BUCKET}/sd")
    assert json.loads(r.out)["uploaded"] == 0 and json.loads(r.out)["already_there"] == 2
    (tmp_path / "out" / "top.safetensors").unlink()
    r = sdbuild("pull", rec, "--json", "--cache-dir", tmp_path / "cache2", "--remote", f"s3://{BUCKET}/sd")
    assert r.code == 0, r
    assert {n: s["source"] for n, s in json.loads(r.out)["steps"].items()} == {"ab": "remote", "top": "remote"}
    assert (tmp_path / "out" / "top.safetensors").read_bytes() == good
    for k in _objects(s3):
        s3.client.delete_object(Bucket=BUCKET, Key=k)
    r = sdbuild("pull", rec, "--cache-dir", tmp_path / "cache3", "--remote", f"s3://{BUCKET}/sd")
    assert r.code == 1 and "step 'ab' is not in" in r.err and "pull never computes" in r.err


# ---------------------------------------------------------------------------------------------------------------
# inputs by URL


class FileServer:
    """Serves a folder with Range support; can drop a connection half-way and redirect."""

    def __init__(self, root: Path):
        self.root = root
        self.drop_once: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.ranges: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                if name in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[name])
                    self.end_headers()
                    return
                p = server.root / name
                if "/" in name or not p.is_file():
                    self.send_error(404)
                    return
                data = p.read_bytes()
                rng = self.headers.get("Range")
                start = 0
                if rng:
                    server.ranges.append(rng)
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    s = FileServer(root)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _url_recipe(tmp_path: Path, files: FileServer, name: str, sha: str, url_name: str | None = None, path: str | None = None) -> Path:
    url = f"{files.url}/{url_name or name}"
    spec = {"sha256": sha, "url": url}
    if path:
        spec["path"] = path
    return write_recipe(tmp_path, "sdbuild: 1\n" + f"inputs: {{m: {json.dumps(spec)}}}\n"
                        "steps: {p: {op: prune, model: m}}\noutputs: {p: out/p.safetensors}\n", name="r.yaml")


def test_fetch_resumes_after_a_dropped_connection(tmp_path, sdbuild, files):
    src = write_synth(files.root / "m.safetensors", "sd1", 64, "fp16", 5)
    files.drop_once.add("m.safetensors")
    rec = _url_recipe(tmp_path, files, "m.safetensors", _sha(src), path="models/m.safetensors")
    assert sdbuild("build", rec).code == 2  # missing until fetched; the message says how to fetch it
    r = sdbuild("fetch", rec, "--json")
    assert r.code == 0, r
    got = tmp_path / "models" / "m.safetensors"
    assert json.loads(r.out)["fetched"] == {"m": str(got)}
    assert got.read_bytes() == src.read_bytes() and files.ranges and files.ranges[0].startswith("bytes=")
    assert not list((tmp_path / "models").glob(".*part"))
    assert sdbuild("build", rec, "-q").code == 0


def test_fetch_sha256_mismatch_deletes_the_download(tmp_path, sdbuild, files):
    src = write_synth(files.root / "m.safetensors", "sd1", 64, "fp16", 5)
    wrong = "0" * 64
    rec = _url_recipe(tmp_path, files, "m.safetensors", wrong)
    models = tmp_path / "models"
    r = sdbuild("fetch", rec, "--models", models)
    assert r.code == 2 and f"{files.url}/m.safetensors" in r.err and wrong in r.err and _sha(src) in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert list(models.iterdir()) == []


def test_fetch_404_names_the_url(tmp_path, sdbuild, files):
    rec = _url_recipe(tmp_path, files, "gone.safetensors", "d" * 64)
    r = sdbuild("fetch", rec, "--models", tmp_path / "models")
    assert r.code == 2 and f"{files.url}/gone.safetensors" in r.err and "404" in r.err


@pytest.mark.parametrize("url_name", ["..%2F..%2Fevil.safetensors", "%2E%2E", ".hidden"])
def test_fetch_refuses_a_name_that_would_leave_the_models_folder(tmp_path, sdbuild, files, url_name):
    rec = _url_recipe(tmp_path, files, "x", "b" * 64, url_name=url_name)
    models = tmp_path / "deep" / "models"
    r = sdbuild("fetch", rec, "--models", models)
    assert r.code == 2 and "would not stay inside the models folder" in r.err
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "deep" / "evil.safetensors").exists()


def test_fetch_never_follows_a_redirect_to_another_scheme(tmp_path, sdbuild, files):
    files.redirects["m.safetensors"] = f"file://{tmp_path}/secret"
    rec = _url_recipe(tmp_path, files, "m.safetensors", "c" * 64)
    r = sdbuild("fetch", rec, "--models", tmp_path / "models")
    assert r.code == 2 and "refusing to follow a redirect" in r.err


def test_a_bad_url_scheme_is_a_recipe_error_with_its_line(tmp_path, sdbuild):
    rec = write_recipe(tmp_path, "sdbuild: 1\ninputs:\n  m:\n    sha256: " + "a" * 64 + "\n    url: ftp://x/m.safetensors\n"
                       "steps: {p: {op: prune, model: m}}\noutputs: {p: p.safetensors}\n")
    r = sdbuild("plan", rec)
    assert r.code == 2 and "recipe.yaml:5" in r.err and "not an https, http or s3 URL" in r.err


def test_reproduce_fetch_rebuilds_from_the_output_file_and_a_url_server(tmp_path, sdbuild, files):
    srcs = {n: write_synth(files.root / f"{n}.safetensors", "sd1", 64, "fp16", s) for n, s in (("a", 1), ("b", 2))}
    inputs = ", ".join(f"{n}: {{path: {n}.safetensors, sha256: {_sha(p)}, url: '{files.url}/{n}.safetensors'}}"
                       for n, p in srcs.items())
    work = tmp_path / "work"
    work.mkdir()
    for n, p in srcs.items():
        (work / p.name).write_bytes(p.read_bytes())
    rec = write_recipe(work, f"sdbuild: 1\ninputs: {{{inputs}}}\nsteps: {{m: {{op: weighted_sum, models: [a, b], alpha: 0.4}}}}\n"
                       "outputs: {m: m.safetensors}\n")
    assert sdbuild("build", rec, "-q").code == 0
    only = tmp_path / "only"
    only.mkdir()
    (only / "m.safetensors").write_bytes((work / "m.safetensors").read_bytes())
    r = sdbuild("reproduce", only / "m.safetensors", "--models", tmp_path / "fresh-models", "--json")
    assert r.code == 2 and "url" in r.err
    r = sdbuild("reproduce", only / "m.safetensors", "--fetch", "--models", tmp_path / "fresh-models", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["same_bytes"] is True
    assert sorted(p.name for p in (tmp_path / "fresh-models").iterdir()) == ["a.safetensors", "b.safetensors"]
