"""LoRA / LyCORIS file parsing into one canonical form: module name (kohya style) -> algorithm + tensor keys.

Formats are told apart per module by the tensor suffixes it carries (docs/formats.md §5.3, §5.5): kohya LoRA/LoCon
(`lora_down`/`lora_up`, Tucker `lora_mid`), LoHa (`hada_*`), LoKr (`lokr_*`), full (`diff`, `diff_b`), norm
(`w_norm`, `b_norm`), IA3 (`weight`, `on_input`), DoRA on top of any of these (`dora_scale`, PEFT
`lora_magnitude_vector`), and diffusers/PEFT names (`lora_A`/`lora_B` under `unet.`, `text_encoder.`,
`text_encoder_2.`, `text_encoder_3.`, `transformer.`, `base_model.model.`, and the older attention-processor layout),
and XLabs Flux LoRAs (`double_blocks.N.processor.qkv_lora1.down.weight`). Parsing reads only names and shapes,
never tensor values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from mergekit_sd.arch import registry
from mergekit_sd.arch.detect import model_kind
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import TensorSpec

# suffix -> algorithm; the suffix itself is the role name used everywhere else
ALGO_OF = {
    "lora_down.weight": "lora", "lora_up.weight": "lora", "lora_mid.weight": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha", "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full", "diff_b": "full",
    "w_norm": "norm", "b_norm": "norm",
    "weight": "ia3", "on_input": "ia3",
}
COMMON = ("alpha", "scale", "dora_scale", "bias")
REFUSED = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "OFT", "oft_rotation": "OFT", "boft_blocks": "BOFT", "boft_R": "BOFT",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "bias_indices": "LyCORIS sparse bias", "bias_values": "LyCORIS sparse bias", "bias_size": "LyCORIS sparse bias",
}
ALGO_TITLES = {"lora": "LoRA", "locon": "LoCon", "tucker": "LoCon (Tucker)", "loha": "LoHa", "lokr": "LoKr",
               "full": "full diff", "norm": "norm diff", "ia3": "IA3"}
REQUIRED_ROLES = {"lora": [("lora_down.weight",), ("lora_up.weight",)],
                  "loha": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
                  "lokr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")],
                  "full": [("diff", "diff_b")], "norm": [("w_norm", "b_norm")], "ia3": [("weight",)]}
PAIRS = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b", "hada_t1": "hada_t2"}


@dataclass(frozen=True)
class Module:
    """One adapted layer of a LoRA file in canonical form."""

    name: str  # canonical kohya-style module name (lora_unet_..., lora_te_..., lora_te1_..., lora_te2_...)
    source: str  # the module's name as written in the file (for messages)
    algo: str  # lora | loha | lokr | full | norm | ia3
    keys: Mapping[str, str]  # role (a kohya/LyCORIS suffix) -> tensor name in the file

    def has(self, role: str) -> bool:
        return role in self.keys

    def kind(self, specs: Mapping[str, TensorSpec]) -> str:
        """Finer algorithm name for reports: LoCon for conv LoRAs, Tucker when `lora_mid` is present."""
        if self.algo == "lora":
            if self.has("lora_mid.weight"):
                return "tucker"
            if len(specs[self.keys["lora_down.weight"]].shape) == 4:
                return "locon"
        return self.algo


@dataclass
class ParsedLora:
    modules: dict[str, Module]
    style: str  # kohya | diffusers | xlabs | mixed
    skipped: list[str] = field(default_factory=list)  # bundled embeddings and the like (warned, not applied)


_KOHYA = re.compile(r"^(lora_unet|lora_te[123]?|lora_transformer|lycoris)_[^.]+$")
# XLabs (x-flux) LoRA processors of Flux blocks; ComfyUI-saved copies carry `diffusion_model.` in front
_XLABS = re.compile(r"^(?:diffusion_model\.)?((?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
                    r"\.(down|up)\.weight$")
_PEFT = [
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.+)\.lora_magnitude_vector(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
_PROCESSOR = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_HF_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _diffusers_name(path: str, te1: str) -> str:
    """`unet.down_blocks.0...` -> `lora_unet_down_blocks_0...` (dots become underscores, as kohya names do)."""
    for prefix, repl in (("unet.", "lora_unet"), ("text_encoder_2.", "lora_te2"), ("text_encoder_3.", "lora_te3"),
                         ("text_encoder.", te1), ("base_model.model.", None), ("transformer.", None),
                         ("diffusion_model.", "lora_unet")):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if repl is None:
                repl = te1 if rest.startswith("text_model.") else "lora_unet"
            return f"{repl}_{rest.replace('.', '_')}"
    if path.startswith("text_model."):
        return f"{te1}_{path.replace('.', '_')}"
    return f"lora_unet_{path.replace('.', '_')}"


def split_key(key: str, te1: str) -> tuple[str, str, str] | None:
    """Tensor name -> (canonical module name, module name in the file, role), or None when not a LoRA tensor."""
    head, dot, suffix = key.partition(".")
    if dot and _KOHYA.match(head):
        name = head
        for alias in ("lycoris_", "lora_transformer_"):
            if head.startswith(alias):
                name = "lora_unet_" + head[len(alias):]
        return name, head, suffix
    m = _XLABS.match(key)
    if m:
        path, part = m.groups()
        return _diffusers_name(path, te1), path, "lora_down.weight" if part == "down" else "lora_up.weight"
    m = _PROCESSOR.match(key)
    if m:
        path, proj, part = m.groups()
        if ".self_attn" in path or path.endswith("self_attn"):
            path = f"{path}.{_HF_ATTN[proj]}"
        else:
            path = f"{path}.{'to_out.0' if proj == 'to_out' else proj}"
        return _diffusers_name(path, te1), path, "lora_down.weight" if part == "down" else "lora_up.weight"
    for rx, role in _PEFT:
        m = rx.match(key)
        if m:
            return _diffusers_name(m.group(1), te1), m.group(1), role
    return None


def parse_lora(specs: Mapping[str, TensorSpec], label: str, te1: str = "lora_te") -> ParsedLora:
    """Group a LoRA file's tensors into modules and decide each module's algorithm from its suffixes."""
    if not any(split_key(k, te1) for k in specs):
        kind = model_kind(specs)
        looks = f"it looks like a {kind}" if kind in ("checkpoint", "vae") else "it has no LoRA tensors"
        raise UserError(f"{label} is not a LoRA: {looks}")
    grouped: dict[str, dict[str, str]] = {}
    sources: dict[str, str] = {}
    styles: set[str] = set()
    skipped: list[str] = []
    for key in sorted(specs):
        if key.startswith("bundle_emb."):
            skipped.append(key)
            continue
        parts = split_key(key, te1)
        if parts is None:
            raise UserError(f"LoRA {label}: tensor {key!r} is not a LoRA/LyCORIS tensor this tool knows")
        name, source, role = parts
        styles.add("kohya" if source == key.partition(".")[0] else "xlabs" if _XLABS.match(key) else "diffusers")
        if role in REFUSED:
            raise UserError(f"LoRA {label}: module {source!r} is {REFUSED[role]} ({role}), which sdbuild does not bake; "
                            "merge it in a tool that supports it, then extract a LoRA")
        if role not in ALGO_OF and role not in COMMON:
            raise UserError(f"LoRA {label}: module {source!r} has an unknown tensor {role!r}")
        roles = grouped.setdefault(name, {})
        if role in roles:
            raise UserError(f"LoRA {label}: module {source!r} appears twice ({roles[role]!r} and {key!r})")
        roles[role] = key
        if sources.setdefault(name, source) != source:
            raise UserError(f"LoRA {label}: modules {sources[name]!r} and {source!r} name the same layer")
    modules: dict[str, Module] = {}
    for name, roles in grouped.items():
        algos = {ALGO_OF[r] for r in roles if r in ALGO_OF}
        src = sources[name]
        if not algos:
            raise UserError(f"LoRA {label}: module {src!r} has only {', '.join(sorted(roles))} and no weights")
        if len(algos) > 1:
            raise UserError(f"LoRA {label}: module {src!r} mixes {' and '.join(sorted(ALGO_TITLES[a] for a in algos))} tensors")
        algo = algos.pop()
        for options in REQUIRED_ROLES[algo]:
            if not any(o in roles for o in options):
                raise UserError(f"LoRA {label}: {ALGO_TITLES[algo]} module {src!r} lacks {' or '.join(options)}")
        for a, b in PAIRS.items():
            if (a in roles) != (b in roles):
                raise UserError(f"LoRA {label}: module {src!r} has {a if a in roles else b} without {b if a in roles else a}")
        if algo == "lokr" and "lokr_t2" in roles and "lokr_w2_a" not in roles:
            raise UserError(f"LoRA {label}: LoKr module {src!r} has lokr_t2 without lokr_w2_a/lokr_w2_b")
        if algo in ("full", "norm", "ia3") and "dora_scale" in roles:
            raise UserError(f"LoRA {label}: module {src!r} has dora_scale on a {ALGO_TITLES[algo]} module")
        modules[name] = Module(name, src, algo, dict(sorted(roles.items())))
    unet_styles = {"sgm" if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) else "diffusers"
                   for n in modules if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks)_", n)}
    if len(unet_styles) > 1:
        raise UserError(f"LoRA {label} names UNet modules both SGM-style (input_blocks_...) and diffusers-style "
                        "(down_blocks_...); such a file is broken")
    if not modules:
        raise UserError(f"LoRA {label} has no LoRA modules")
    return ParsedLora(modules, "mixed" if len(styles) > 1 else (styles.pop() if styles else "kohya"), skipped)


# --- architecture a LoRA was made for --------------------------------------------------------------------------

def declared_arch(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(sd1 | sd2 | sdxl | flux | sd3 | sd35m | sd35l | mmdit (any SD3/3.5) | other | None, why) from kohya `ss_*`
    and ModelSpec metadata (docs/formats.md §4.6)."""
    base = (metadata.get("ss_base_model_version") or "").strip()
    if base:
        low = base.lower()
        for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("flux", "flux"), ("sd3", "mmdit")):
            if low.startswith(prefix):
                return arch, f"ss_base_model_version={base}"
        return low, f"ss_base_model_version={base}"
    spec = (metadata.get("modelspec.architecture") or "").strip()
    if spec:
        low = spec.lower()
        for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"),
                             *_registered_modelspecs()):
            if low.startswith(prefix):
                return arch, f"modelspec.architecture={spec}"
        return low.split("/")[0], f"modelspec.architecture={spec}"
    if (metadata.get("ss_v2") or "").strip().lower() == "true":
        return "sd2", "ss_v2=True"
    return None, ""


def _registered_modelspecs() -> list[tuple[str, str]]:
    """(ModelSpec id, architecture) of Flux and SD3/3.5, longest id first (`...-v3.5-medium` before `...-v3`)."""
    pairs = {(ms, a.id) for a in registry.all_architectures() for ms in a.modelspec.values()}
    pairs.add(("flux-1", "flux"))
    return sorted(pairs, key=lambda p: -len(p[0]))


_UNET_NAMES = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks)_")
_FLUX_NAMES = re.compile(r"^lora_unet_(double_blocks|single_blocks|single_transformer_blocks)_")
_MMDIT_NAMES = re.compile(r"^lora_unet_joint_blocks_")


def name_arch(modules: Mapping[str, Module]) -> tuple[str | None, str]:
    """What module names alone reveal: Flux and MMDiT block names, UNet block names (an SD1/SD2/SDXL LoRA), and a
    second text encoder beside a UNet (SDXL)."""
    for rx, arch, what in ((_FLUX_NAMES, "flux", "Flux"), (_MMDIT_NAMES, "mmdit", "SD3/SD3.5")):
        for n, m in modules.items():
            if rx.match(n):
                return arch, f"module {m.source!r} names a {what} block"
    for n, m in modules.items():
        if n.startswith(("lora_te1_", "lora_te2_")):
            return "sdxl", f"module {m.source!r} belongs to SDXL's text encoders"
    for n, m in modules.items():
        if _UNET_NAMES.match(n):
            return "unet", f"module {m.source!r} names a UNet block"
    return None, ""
