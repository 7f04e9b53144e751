"""A first build hashes each new input from the same reads that feed the merge: one read of every byte, the same
digests as a separate hashing pass, the same output bytes as a build whose inputs were hashed beforehand."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from mergekit_sd.engine import memo
from mergekit_sd.engine.state import StateDB
from mergekit_sd.formats import safetensors as tensorio
from mergekit_sd.formats.hashread import HashingReader


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
          top: {{op: add_difference, models: [mix, B, A], alpha: 0.5}}
        outputs: {{mix: out/mix.safetensors, top: out/top.safetensors}}
        """)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_first_build_reads_each_input_byte_once(tmp_path, model_dir, sdbuild, monkeypatch):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
        outputs: {{mix: out/mix.safetensors}}
        """)
    reads = [0]
    orig = tensorio._preadinto

    def counting(fd, buf, offset, where=None):
        reads[0] += len(buf)
        return orig(fd, buf, offset, where)

    monkeypatch.setattr(tensorio, "_preadinto", counting)
    hashed = memo.STATS["files_hashed"]
    assert sdbuild("build", rp, "-q").code == 0
    assert memo.STATS["files_hashed"] == hashed  # no separate hashing pass
    files = [model_dir / f"{n}.safetensors" for n in "ab"]
    data = sum(f.stat().st_size for f in files)
    headers = sum(tensorio.SafetensorsFile(f).data_start for f in files)
    # tensor bytes once (headers are parsed by planning, the pre-build validation and the read itself); a separate
    # hashing pass would read every tensor byte twice
    assert reads[0] <= data + 6 * headers < 2 * data - headers
    db = StateDB(tmp_path / "cache")
    for n in "ab":
        p = (model_dir / f"{n}.safetensors").resolve()
        _, digest, sha = db.memo(p)
        assert sha == _sha(p)
        assert digest == tensorio.file_content_digest(p, with_sha256=False)[0]


def test_output_bytes_match_a_build_with_inputs_hashed_first(tmp_path, model_dir, sdbuild):
    fresh, hashed_first = tmp_path / "fresh", tmp_path / "first"
    for d in (fresh, hashed_first):
        d.mkdir()
    r1 = _recipe(fresh, model_dir)
    assert sdbuild("build", r1, "-q", "--cache-dir", fresh / "cache").code == 0
    r2 = _recipe(hashed_first, model_dir)
    assert sdbuild("plan", r2, "--cache-dir", hashed_first / "cache").code == 0  # planning hashes the inputs
    assert sdbuild("build", r2, "-q", "--cache-dir", hashed_first / "cache").code == 0
    for out in ("mix", "top"):
        assert _sha(fresh / f"out/{out}.safetensors") == _sha(hashed_first / f"out/{out}.safetensors")
    names = lambda d: sorted(p.name for p in (d / "cache/objects").glob("*/*"))  # noqa: E731
    assert names(fresh) == names(hashed_first)  # the same keys
    r = sdbuild("build", r1, "--json", "--cache-dir", fresh / "cache")
    assert json.loads(r.out)["built"] == []


def _write_layout(path: Path, tensors: dict[str, torch.Tensor], order: list[str], gap: int = 0) -> None:
    """A safetensors file whose data lies in `order` with `gap` junk bytes between tensors."""
    header, blobs, off = {}, [], 0
    for n in order:
        b = tensors[n].contiguous().view(torch.uint8).numpy().tobytes() if tensors[n].numel() else b""
        header[n] = {"dtype": tensorio.dtype_code(tensors[n].dtype), "shape": list(tensors[n].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b + b"\xab" * gap)
        off += len(b) + gap
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs) + b"tail")


@pytest.mark.parametrize("hold_limit", [0, 1 << 30])
@pytest.mark.parametrize("gap", [0, 3])
@pytest.mark.parametrize("read_some", [False, True])
def test_digests_match_a_separate_pass_for_any_layout(tmp_path, hold_limit, gap, read_some):
    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i:02d}": torch.randn(7 + i, generator=g).to(torch.float16) for i in range(12)}
    tensors["empty"] = torch.empty(0, dtype=torch.float32)
    tensors["ids"] = torch.arange(5, dtype=torch.int64)
    p = tmp_path / "m.safetensors"
    _write_layout(p, tensors, sorted(tensors, reverse=True), gap)  # file order is the reverse of read order
    reader = HashingReader(tensorio.SafetensorsFile(p), hold_limit=hold_limit)
    model = reader.lazy()
    names = model.keys()[::3] if read_some else model.keys()
    for n in names:
        torch.testing.assert_close(model.get(n), tensors[n], rtol=0, atol=0)
    digest, sha = reader.finish()
    assert sha == _sha(p)
    assert digest == tensorio.file_content_digest(p, with_sha256=False)[0]


def test_identical_new_inputs_still_give_the_bytes_of_a_hashed_first_build(tmp_path, model_dir, sdbuild):
    """Two new inputs with the same content share one metadata record, so the settled header is shorter than the
    one reserved with distinct placeholders: the data is moved behind it and the bytes still match."""
    models = tmp_path / "m"
    models.mkdir()
    shutil.copy(model_dir / "a.safetensors", models / "a.safetensors")
    shutil.copy(model_dir / "a.safetensors", models / "twin.safetensors")
    outs = []
    for sub, plan_first in (("fresh", False), ("first", True)):
        d = tmp_path / sub
        d.mkdir()
        rp = write_recipe(d, f"""
            sdbuild: 1
            inputs: {{A: {models}/a.safetensors, T: {models}/twin.safetensors}}
            steps:
              mix: {{op: weighted_sum, models: [A, T], alpha: 0.5}}
            outputs: {{mix: mix.safetensors}}
            """)
        if plan_first:
            assert sdbuild("plan", rp, "--cache-dir", d / "cache").code == 0
        assert sdbuild("build", rp, "-q", "--cache-dir", d / "cache").code == 0
        tensorio.SafetensorsFile(d / "mix.safetensors").close()  # a valid file
        outs.append(_sha(d / "mix.safetensors"))
    assert outs[0] == outs[1]
