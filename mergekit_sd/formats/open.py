"""The one entry point for opening model files of any supported container."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_sd.formats.fp8 import dequantise_scaled_fp8
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel
from mergekit_sd.formats.ckpt import open_ckpt, rename_model
from mergekit_sd.formats.digests import sha256_file
from mergekit_sd.formats.safetensors import SafetensorsFile, file_content_digest, model_content_digest

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")


def open_model(path: str | os.PathLike) -> LazyModel:
    """A lazy model over a file; legacy pickles are read with torch's weights-only loader.

    Old NovelAI-style CLIP names and SD 2.1-Turbo's SGM names are renamed on load (as AUTOMATIC1111 does), so such
    files merge key for key with everything else.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext in PICKLE_EXT:
        return open_ckpt(p)
    if ext in SAFETENSORS_EXT or ext == "":
        return as_loaded(SafetensorsFile(p).lazy())
    raise UserError(f"unsupported model file type {ext!r}; use .safetensors (or a legacy .ckpt/.pt)", str(p))


def as_loaded(model: LazyModel) -> LazyModel:
    """A safetensors file's tensors as every op sees them: legacy names renamed, scaled fp8 dequantised."""
    return dequantise_scaled_fp8(rename_model(model))


def content_digest_and_sha256(path: Path, want_sha256: bool = True,
                              per_tensor: dict[str, bytes] | None = None) -> tuple[str, str | None]:
    """A model file's content digest and sha256; `per_tensor` receives each tensor's digest from the same pass
    (safetensors only: a pickle has no byte layout of its own)."""
    ext = path.suffix.lower()
    if ext in PICKLE_EXT:
        digest = model_content_digest(open_model(path))
        return digest, (sha256_file(path) if want_sha256 else None)
    return file_content_digest(path, want_sha256, per_tensor)
