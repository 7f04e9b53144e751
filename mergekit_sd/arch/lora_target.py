"""Where a LoRA module lands in a checkpoint (`Target`) and the name -> target table of one architecture (`Table`).

Kept apart from the tables themselves (arch.lora_keys for SD1/SD2/SDXL, arch.lora_transformer_keys for Flux and
SD3/3.5) so both build the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergekit_sd.arch.prefixes import UNET

Rows = tuple[int, int, int]  # rows [start·n/of, stop·n/of) of a tensor with n rows, as (start, stop, of)


def row_slice(rows: Rows | None, n: int) -> slice:
    if rows is None:
        return slice(None)
    start, stop, of = rows
    return slice(start * n // of, stop * n // of)


def row_count(rows: Rows | None, n: int) -> int:
    sl = row_slice(rows, n)
    return len(range(*sl.indices(n)))


@dataclass(frozen=True)
class Target:
    """Where a module lands: `base` + `.weight` / `.bias`, or rows `part` (0 = q, 1 = k, 2 = v) of a fused
    OpenCLIP `in_proj_weight` / `in_proj_bias`.

    Transformer models add `rows` (the module writes only these rows of the tensor: a diffusers `to_q` on Flux's
    fused `qkv`), `src` (only these rows of the module's ΔW land here: a kohya `qkv` module on a diffusers model's
    `to_q`), `swap` (ΔW's two halves land in the other order: diffusers' shift/scale swap) and `comp`."""

    base: str
    part: int | None = None
    weight_suffix: str = ".weight"
    rows: Rows | None = None
    src: Rows | None = None
    swap: bool = False
    comp: str | None = None

    @property
    def weight(self) -> str:
        return self.base + self.weight_suffix

    @property
    def bias(self) -> str:
        return self.base + (".bias" if self.weight_suffix == ".weight" else "_bias")

    @property
    def component(self) -> str:
        if self.comp is not None:
            return self.comp
        return "unet" if self.base.startswith(UNET) else "te"

    @property
    def dst(self) -> Rows | None:
        """The rows of the tensor this module writes."""
        return (self.part, self.part + 1, 3) if self.part is not None else self.rows

    @property
    def whole(self) -> bool:
        """The module's ΔW is the whole tensor's (no rows, no swap)."""
        return self.dst is None and self.src is None and not self.swap

    def slice_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the rows this module writes."""
        if self.dst is None or not shape:
            return tuple(shape)
        return (row_count(self.dst, shape[0]),) + tuple(shape[1:])

    def describe(self) -> str:
        if self.part is not None:
            return f"{self.weight} rows of {'qkv'[self.part]}"
        out = self.weight
        if self.rows is not None:
            out += f" rows {self.rows[0]}/{self.rows[2]}..{self.rows[1]}/{self.rows[2]}"
        if self.src is not None:
            out += f" (rows {self.src[0]}/{self.src[2]}..{self.src[1]}/{self.src[2]} of the module)"
        return out


def kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


@dataclass(frozen=True)
class Table:
    """Module name -> target for one architecture, plus the preferred (kohya-default) name of each target."""

    arch: str
    modules: dict[str, Target]
    preferred: dict[Target, str]
    paths: dict[Target, str]  # diffusers/PEFT dotted path with its component prefix (unet., text_encoder., ...)
    multi: dict[str, tuple[Target, ...]] = field(default_factory=dict)  # names whose ΔW is split over tensors

    def lookup(self, name: str) -> Target | None:
        return self.modules.get(name)

    def targets(self, name: str) -> tuple[Target, ...]:
        """Every place module `name` writes to (several for a fused module on a model that splits it)."""
        if name in self.multi:
            return self.multi[name]
        t = self.modules.get(name)
        return (t,) if t is not None else ()
