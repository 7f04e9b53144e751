"""LoRA module name -> checkpoint key lookup tables, one per architecture (docs/formats.md §5.1, §5.2).

Module names replace every `.` of a path by `_`, and real paths contain underscores (`transformer_blocks`,
`to_out_0`, `in_layers_2`), so a name cannot be split back into a path. Instead every weight of the target layout
is enumerated, each of its possible module names is computed (diffusers-style and SGM-style UNet names, HF CLIP
names for both CLIP-L and OpenCLIP encoders) and the mapping is inverted. SD1 and SDXL enumerate their reference
key lists; SD2 has no reference list, so its table takes the SD1 UNet names (same layout) and generates the
OpenCLIP ViT-H text encoder (24 blocks, docs/formats.md §1.5).
"""

from __future__ import annotations

import re
from functools import lru_cache

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import BARE
from mergekit_sd.arch.detect import LORA_ARCHES as ARCHES, TITLES, ArchInfo
from mergekit_sd.arch.lora_target import Rows, Table, Target, kohya, row_count, row_slice
from mergekit_sd.arch.lora_transformer_keys import TRANSFORMER_ARCHES, transformer_table
from mergekit_sd.arch.prefixes import SD1_TE, SD2_TE, SDXL_TE1, SDXL_TE2, UNET
from mergekit_sd.arch.reference import reference_keys

__all__ = ["ARCHES", "ARCH_TITLES", "FAMILIES", "TRANSFORMER_ARCHES", "Rows", "Table", "Target", "UNET", "arch_matches",
           "default_modules", "kohya", "ldm_to_diffusers", "model_table", "row_count", "row_slice", "table",
           "te1_prefix"]

ARCH_TITLES = {**{a: TITLES[a] for a in ARCHES}, **{a: registry.get(a).title for a in TRANSFORMER_ARCHES},
               "unet": "SD1/SD2/SDXL", "mmdit": "SD3/SD3.5"}
# architecture families a LoRA's names or metadata can name without telling the member
FAMILIES = {"unet": ("sd1", "sd2", "sdxl", "sdxl-refiner"), "mmdit": ("sd3", "sd35m", "sd35l")}


def arch_matches(declared: str, arch: str) -> bool:
    """A LoRA declared (or named) for `declared` fits a model of `arch`: the same id, or a member of its family."""
    return declared == arch or arch in FAMILIES.get(declared, ())


def model_table(info: ArchInfo) -> Table | None:
    """The LoRA module table of a detected model (in its naming), or None when LoRAs cannot be baked into it."""
    if info.lora_arch is not None:
        return table(info.lora_arch)
    if info.arch in TRANSFORMER_ARCHES:
        return table(info.arch, info.naming or BARE)
    return None


def te1_prefix(arch: str) -> str:
    """What diffusers' `text_encoder.` becomes in kohya names for this architecture."""
    return "lora_te" if arch in ("sd1", "sd2") else "lora_te1"

RESNET_INNER = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def ldm_to_diffusers(path: str) -> str | None:
    """UNet path under `model.diffusion_model.` (LDM/SGM) -> diffusers module path, or None when it has none."""
    mid = re.match(r"middle_block\.(\d+)\.(.+)$", path)
    if mid is not None:
        path = f"middle_block.{mid.group(1)}.0.{mid.group(2)}"
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(\d+)\.(.+)$", path)
    if m is None:
        stem = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
                "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
        return stem.get(path)
    kind, n, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        if n == 0:
            return None
        if n % 3 == 0:  # downsampler of level n/3 - 1
            return f"down_blocks.{n // 3 - 1}.downsamplers.0.conv" if (k, rest) == (0, "op") else None
        level, j = (n - 1) // 3, (n - 1) % 3
        block = f"down_blocks.{level}.resnets.{j}" if k == 0 else f"down_blocks.{level}.attentions.{j}"
    elif kind == "middle_block":
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[n]
    else:
        level, j = n // 3, n % 3
        if k > 0 and rest == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
        block = f"up_blocks.{level}.resnets.{j}" if k == 0 else f"up_blocks.{level}.attentions.{j}"
    if ".resnets." in block:
        inner = RESNET_INNER.get(rest)
        return f"{block}.{inner}" if inner else None
    return f"{block}.{rest}"


def _openclip_to_hf(rest: str) -> tuple[str, int | None] | list[tuple[str, int]] | None:
    """OpenCLIP module path (after the encoder prefix, no `.weight`) -> HF CLIP path(s)."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if m is None:
        return {"ln_final": ("text_model.final_layer_norm", None),
                "token_embedding": ("text_model.embeddings.token_embedding", None)}.get(rest)
    n, inner = m.group(1), m.group(2)
    layer = f"text_model.encoder.layers.{n}"
    if inner == "attn.in_proj":
        return [(f"{layer}.self_attn.{p}", i) for p, i in QKV.items()]
    hf = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "ln_1": "layer_norm1", "ln_2": "layer_norm2"}.get(inner)
    return (f"{layer}.{hf}", None) if hf else None


def _weight_bases(keys) -> list[str]:
    out = []
    for k in keys:
        if k.endswith(".weight"):
            out.append(k[: -len(".weight")])
        elif k.endswith("in_proj_weight"):
            out.append(k[: -len("_weight")])
    return out


def _sd2_te_bases() -> list[str]:
    bases = ["ln_final", "token_embedding"]
    for n in range(24):
        for inner in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"):
            bases.append(f"transformer.resblocks.{n}.{inner}")
    return [SD2_TE + b for b in bases]


@lru_cache(maxsize=None)
def table(arch: str, naming: str | None = None) -> Table:
    """The module table of `arch`; transformer architectures also take the model's `naming` (default BFL)."""
    if arch in TRANSFORMER_ARCHES:
        return transformer_table(arch, naming or BARE)
    if arch not in ARCHES:
        raise KeyError(f"no LoRA key table for {arch!r}")
    ref = reference_keys("sdxl" if arch == "sdxl" else "sd1")
    modules: dict[str, Target] = {}
    preferred: dict[Target, str] = {}
    paths: dict[Target, str] = {}

    def add(name: str, target: Target, prefer: bool = False) -> None:
        old = modules.get(name)
        if old is not None and old != target:
            raise AssertionError(f"LoRA module name {name} is ambiguous: {old} / {target}")
        modules[name] = target
        if prefer or target not in preferred:
            preferred[target] = name

    unet = [b for b in _weight_bases(ref) if b.startswith(UNET)]
    for base in unet:
        path = base[len(UNET):]
        t = Target(base)
        diff = ldm_to_diffusers(path)
        # kohya names SD1/SD2 modules by diffusers paths, SDXL modules by SGM paths (§5.1); both are accepted
        if diff is not None:
            add(kohya("lora_unet", diff), t, prefer=arch != "sdxl")
            paths[t] = "unet." + diff
        add(kohya("lora_unet", path), t, prefer=arch == "sdxl" or diff is None)

    def add_hf(prefix: str, te_prefix: str, keys, component: str) -> None:
        for base in _weight_bases(keys):
            if base.startswith(te_prefix) and base[len(te_prefix):].startswith("text_model."):
                add(kohya(prefix, base[len(te_prefix):]), Target(base))
                paths[Target(base)] = component + base[len(te_prefix):]

    def add_openclip(prefix: str, te_prefix: str, bases, component: str) -> None:
        for base in bases:
            rest = base[len(te_prefix):]
            hf = _openclip_to_hf(rest)
            if hf is None:
                continue
            if isinstance(hf, list):
                for p, part in hf:
                    add(kohya(prefix, p), Target(base, part, "_weight"))
                    paths[Target(base, part, "_weight")] = component + p
            else:
                add(kohya(prefix, hf[0]), Target(base))
                paths[Target(base)] = component + hf[0]

    if arch == "sd1":
        add_hf("lora_te", SD1_TE, ref, "text_encoder.")
    elif arch == "sd2":
        add_openclip("lora_te", SD2_TE, _sd2_te_bases(), "text_encoder.")
    else:
        add_hf("lora_te1", SDXL_TE1, ref, "text_encoder.")
        add_openclip("lora_te2", SDXL_TE2, [b for b in _weight_bases(ref) if b.startswith(SDXL_TE2)], "text_encoder_2.")
    return Table(arch, modules, preferred, paths)


# default kohya LoRA targets (§5.1): Linear/Conv inside transformer blocks, CLIP attention and MLP
_DEFAULT_UNET = re.compile(r"\.(proj_in|proj_out|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)$")
_CONV_UNET = re.compile(r"\.(\d+\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)|\d+\.0\.op|\d+\.conv)$")
_DEFAULT_TE = re.compile(r"_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")


_TRANSFORMER_BLOCKS = re.compile(r"(^|\.)(double_blocks|single_blocks|joint_blocks)\.")


def default_modules(arch: str, conv: bool = False, naming: str | None = None) -> dict[str, Target]:
    """The module set kohya trains (and extracts) by default, by preferred name; `conv` adds the ResBlock,
    downsample and upsample layers (LoCon / `conv_dim`). Flux and SD3: every linear layer of the transformer blocks
    (kohya's DoubleStreamBlock/SingleStreamBlock and SingleDiTBlock targets) and CLIP attention/MLP."""
    if arch in TRANSFORMER_ARCHES:
        tab = table(arch, naming)
        out = {}
        for target, name in tab.preferred.items():
            if target.component == "unet" and _TRANSFORMER_BLOCKS.search(target.base):
                out[name] = target
            elif target.component == "te" and name.startswith("lora_te1_") and _DEFAULT_TE.search(name):
                out[name] = target
        return dict(sorted(out.items()))
    t = table(arch)
    out: dict[str, Target] = {}
    for target, name in t.preferred.items():
        if target.component == "unet":
            path = target.base
            if _DEFAULT_UNET.search(path) or (conv and _CONV_UNET.search(path) and ".transformer_blocks." not in path):
                out[name] = target
        elif _DEFAULT_TE.search(name):
            out[name] = target
    return dict(sorted(out.items()))
