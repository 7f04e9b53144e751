"""Legacy `.ckpt` / `.pt` / `.bin` inputs, read without ever running code from the file.

Pickles can execute arbitrary code when loaded, so they are opened only with torch's weights-only unpickler.
Lightning training checkpoints name a few harmless classes in their training state (the checkpoint callback, numpy
scalars); those names resolve to an inert placeholder that stores nothing. Any other global makes the load fail and
the file is refused with a one-line error. After loading: unwrap `state_dict`, drop training state (recorded in
`info.provenance`), rename NovelAI-style CLIP aliases and SD 2.1-Turbo SGM names to the standard layout.
Outputs are always safetensors; nothing here writes pickles.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, ModelInfo, TensorSpec
from mergekit_sd.formats.safetensors import CODE_OF, SafetensorsFile

NAI_ALIAS = "cond_stage_model.transformer."
NAI_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
TURBO_MARKER = "conditioner.embedders.0.model.ln_final.weight"


class _Inert:
    """Placeholder for allow-listed training-state classes: accepts any arguments and state, keeps none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Classes that appear only in the training state of published Lightning checkpoints (A1111's unpickler allows the
# same ones). They are mapped to `_Inert`, so nothing from numpy or Lightning is imported or called.
_INERT_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Int64DType",
)


def _inert_globals() -> list:
    out = []
    for i, name in enumerate(_INERT_NAMES):
        cls = type(f"_Inert{i}", (_Inert,), {})  # one class per name: the allow-list is keyed by object
        out.append((cls, name))
    return out


def _load(path: Path) -> Any:
    where = str(path)
    try:
        if not path.is_file():
            raise UserError("model file not found" if not path.exists() else "not a regular file", where)
    except OSError as e:
        raise UserError(f"cannot open model file: {e.strerror}", where) from None
    with torch.serialization.safe_globals(_inert_globals()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes about pickle protocols would break the one-line contract
        for mmap in (True, False):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                glob, detail = _unsafe_detail(e)
                if glob:
                    raise UserError(
                        f"refused to load this pickle: it needs code to run (it calls {glob}); nothing was executed. "
                        "Convert it to .safetensors with a tool you trust, or ask its author for a safetensors file", where
                    ) from None
                raise UserError(
                    f"not a readable PyTorch checkpoint: the safe loader stopped at {detail or 'an unsupported instruction'}; "
                    "nothing was executed (corrupt file, or a pickle made by another program)", where
                ) from None
            except RuntimeError as e:
                if mmap and "mmap" in str(e):
                    continue  # old (non-zip) torch format: cannot be memory-mapped, read it normally
                raise UserError(f"cannot read legacy checkpoint: {_first_line(e)}", where) from None
            except (EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError, AttributeError,
                    ImportError, OverflowError, MemoryError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read legacy checkpoint (truncated or corrupt?): {type(e).__name__}: {_first_line(e)}", where) from None
            except OSError as e:
                raise UserError(f"cannot read legacy checkpoint: {e.strerror or _first_line(e)}", where) from None
    raise UserError("cannot read legacy checkpoint", where)  # pragma: no cover


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _unsafe_detail(e: BaseException) -> tuple[str | None, str]:
    """(the global a pickle wanted to call, if torch names one; the loader's own reason)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL " in line:
            return line.split("GLOBAL ", 1)[1].split()[0].rstrip(",.:"), line
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return None, lines[i + 1][:120]
    return None, (lines[-1][:120] if lines else "")


def _looks_like_safetensors(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= p.stat().st_size - 8


def unwrap_state_dict(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights and the names of everything dropped as training state (A1111's rule: pop `state_dict`, twice)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"not a checkpoint: the pickle holds a {type(obj).__name__}, not a state dict", where)
    dropped: list[str] = []
    sd: Any = obj
    if isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
        dropped += [str(k) for k in obj if k != "state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if isinstance(k, str) and k != "state_dict" and isinstance(v, torch.Tensor):
            tensors[k] = v
        else:
            dropped.append(("state_dict." if sd is not obj else "") + str(k))
    return tensors, sorted(set(dropped))


def legacy_renames(names) -> dict[str, str]:
    """old name -> new name for NovelAI CLIP aliases and SD 2.1-Turbo SGM naming (docs/formats.md §1.2)."""
    names = set(names)
    out: dict[str, str] = {}
    for n in names:
        if n.startswith(NAI_ALIAS) and n[len(NAI_ALIAS):].startswith(NAI_PARTS):
            out[n] = NAI_ALIAS + "text_model." + n[len(NAI_ALIAS):]
    return out


def turbo_renames(specs: Mapping[str, TensorSpec]) -> dict[str, str]:
    """SD 2.1-Turbo ships OpenCLIP-H (width 1024) under `conditioner.embedders.0.`; A1111 renames it to `cond_stage_model.`."""
    spec = specs.get(TURBO_MARKER)
    if spec is None or spec.shape != (1024,) or any(k.startswith("conditioner.embedders.1.") for k in specs):
        return {}
    p = "conditioner.embedders.0."
    return {k: "cond_stage_model." + k[len(p):] for k in specs if k.startswith(p)}


def rename_model(model: LazyModel) -> LazyModel:
    """Apply the legacy renames to any lazy model; alias copies whose proper name also exists are dropped."""
    specs = model.specs
    ren = {**legacy_renames(specs), **turbo_renames(specs)}
    if not ren:
        return model
    back: dict[str, str] = {}
    new_specs: dict[str, TensorSpec] = {}
    dropped: list[str] = []
    for k, s in specs.items():
        if k in ren and ren[k] in specs:
            dropped.append(k)
            continue
        nk = ren.get(k, k)
        back[nk] = k
        new_specs[nk] = s
    prov = dict(model.info.provenance)
    prov["renamed"] = len(ren) - len(dropped)
    if dropped:
        prov["dropped_aliases"] = len(dropped)
    return LazyModel(new_specs, lambda k: model.get(back[k]), model.metadata, model.label, replace(model.info, provenance=prov),
                     ranger=lambda k, s, e: model.get_range(back[k], s, e))


def open_ckpt(path: str | os.PathLike) -> LazyModel:
    """A lazy model over a legacy pickle checkpoint, loaded weights-only (memory-mapped when the format allows)."""
    p = Path(path)
    where = str(p)
    if _looks_like_safetensors(p):  # a safetensors file under a legacy extension: read it as what it is
        return rename_model(SafetensorsFile(p).lazy())
    obj = _load(p)
    tensors, dropped = unwrap_state_dict(obj, where)
    if not tensors:
        raise UserError("no tensors found in this checkpoint", where)
    specs: dict[str, TensorSpec] = {}
    for k, t in tensors.items():
        if t.layout != torch.strided or t.is_quantized or t.dtype not in CODE_OF:
            raise UserError(f"tensor {k!r} has an unsupported type ({t.dtype}, {t.layout}); convert the file with a trusted tool", where)
        specs[k] = TensorSpec(t.dtype, tuple(t.shape))

    def produce(k: str) -> torch.Tensor:
        t = tensors[k]
        if isinstance(t, torch.nn.Parameter):
            t = t.detach()
        return t.contiguous()

    info = ModelInfo(format="ckpt")
    if dropped:
        info.provenance = {"training_state_dropped": dropped}
        info.log = [f"dropped training state from {p.name}: {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}"]
    model = LazyModel(specs, produce, {}, label=p.name, info=info)
    return rename_model(model)
