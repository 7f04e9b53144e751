"""Block-weighted merging (MBW): block lists, key -> block rule sets, presets, selectors, elemental and include/exclude.

docs/formats.md §3. Which block a tensor belongs to differs between tools and their versions (SD1 `time_embed` is IN00,
OUT11 or BASE depending on who you ask), so the mapping is a named, versioned rule set that a recipe may choose with
`block_rule:` and that every output records in its provenance. The transformer architectures (Flux, SD3/3.5) declare
their named blocks in their own modules (`arch.blockmap`); the `comfyui-2024` rule maps them. Everything here works
on tensor *names* only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterable

from mergekit_sd.arch import blockmap, registry
from mergekit_sd.arch.prefixes import UNET, VAE as VAE_PREFIX
from mergekit_sd.errors import UserError, did_you_mean

SD_BLOCKS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SDXL_BLOCKS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
VAE = "VAE"
TE = blockmap.TE
SD_FAMILIES = ("sd", "sdxl")
# block family -> its blocks in list order: SD1/SD2, SDXL, then one per block list of arch.models (flux, mmdit24, ...)
FAMILY_BLOCKS = {"sd": SD_BLOCKS, "sdxl": SDXL_BLOCKS, **{f: blockmap.family_blocks(f) for f in blockmap.families()}}
FAMILY_NAME = {"sd": "SD1/SD2", "sdxl": "SDXL", **{f: blockmap.family_title(f) for f in blockmap.families()}}
# the order ranges are read in: SDXL's list is a subsequence of this one
_ORDER = {b: i for i, b in enumerate(SD_BLOCKS)}
GROUPS = ("BASE", "IN", "M", "OUT", "VAE")
_T_HEADS, _T_STEMS = blockmap.all_block_names()
# group -> block-name prefix for the transformer families (`DOUBLE` -> `double_blocks.`), and TE
T_GROUPS = {g: p for f in blockmap.families() for g, p in blockmap.family_groups(f).items()}
ALL_GROUPS = (*GROUPS, *sorted(T_GROUPS), TE)

# ---------------------------------------------------------------------------------------------------------------
# key -> block rule sets (docs/formats.md §3.2)

_IN_RE = re.compile(r"\.input_blocks\.(\d+)\.")
_MID_RE = re.compile(r"\.middle_block\.(\d+)\.")
_OUT_RE = re.compile(r"\.output_blocks\.(\d+)\.")


def is_vae_key(key: str) -> bool:
    return key.startswith(VAE_PREFIX)


def _unet_block(key: str) -> str | None:
    if m := _IN_RE.search(key):
        return f"IN{int(m.group(1)):02d}"
    if _MID_RE.search(key):
        return "M00"
    if m := _OUT_RE.search(key):
        return f"OUT{int(m.group(1)):02d}"
    return None


def _sd_rule(time_embed: str) -> Callable[[str], str | None]:
    """SD1/SD2: test order of the source: time_embed, `.out.`, input/middle/output blocks, else BASE."""

    def block(key: str) -> str | None:
        if "time_embed" in key:
            return time_embed
        if ".out." in key:
            return "OUT11"
        return _unet_block(key) or "BASE"

    return block


def _sdxl_rule(embeds: str | None) -> Callable[[str], str | None]:
    """SDXL: label_emb/time_embed go to `embeds` (None: not merged), the head to OUT08, everything off the UNet BASE."""

    def block(key: str) -> str | None:
        if "label_emb" in key or "time_embed" in key:
            return embeds
        if not key.startswith(UNET):
            return "BASE"
        if key.startswith(UNET + "out."):
            return "OUT08"
        return _unet_block(key) or "BASE"

    return block


@dataclass(frozen=True)
class BlockRule:
    """A named, versioned key -> block mapping, one map per block family it covers."""

    id: str
    doc: str
    maps: dict[str, Callable[[str], str | None]]

    def block(self, key: str, family: str) -> str | None:
        """The block of `key`, or None when this rule set leaves the tensor unmerged (kept from the first model)."""
        return self.map_for(family)(key)

    def map_for(self, family: str) -> Callable[[str], str | None]:
        """The key -> block map for a family; a UserError naming the rules that have one when this rule has none."""
        fn = self.maps.get(family)
        if fn is None:
            others = [r.id for r in RULES.values() if family in r.maps]
            raise UserError(f"block rule {self.id!r} has no {FAMILY_NAME.get(family, family)} block map"
                            + (f"; {FAMILY_NAME.get(family, family)} blocks follow {' or '.join(others)}" if others else ""))
        return fn


RULES: dict[str, BlockRule] = {
    r.id: r
    for r in (
        BlockRule("supermerger-2025", "supermerger since 2025-11-27: SD1 time_embed -> IN00; SDXL time_embed/label_emb -> IN00",
                  {"sd": _sd_rule("IN00"), "sdxl": _sdxl_rule("IN00")}),
        BlockRule("supermerger-2023", "supermerger 2023-07-21 .. 2025-11-26: SD1 time_embed -> OUT11; SDXL time_embed/label_emb not merged",
                  {"sd": _sd_rule("OUT11"), "sdxl": _sdxl_rule(None)}),
        BlockRule("sd-mecha", "sd-mecha block conversion: time_embed (and SDXL label_emb) -> BASE",
                  {"sd": _sd_rule("BASE"), "sdxl": _sdxl_rule("BASE")}),
        BlockRule("mbw-classic", "original MBW extension and supermerger before 2023-07 (SD1/SD2 only): time_embed -> IN00",
                  {"sd": _sd_rule("IN00")}),
        BlockRule("comfyui-2024", "ComfyUI's model-specific merge nodes (ModelMergeFlux1, ModelMergeSD3_2B, "
                  "ModelMergeSD35_Large): Flux.1 and SD3/SD3.5 named blocks, in every naming",
                  {f: blockmap.block_function(f) for f in blockmap.families()}),
    )
}
DEFAULT_RULE = "supermerger-2025"
TRANSFORMER_RULE = "comfyui-2024"


def default_rule(family: str | None) -> str:
    """The rule used when a step names none: supermerger's for SD1/SD2/SDXL, ComfyUI's for the transformer families."""
    return DEFAULT_RULE if family is None or family in SD_FAMILIES else TRANSFORMER_RULE


def get_rule(rule: str | None, where: str | None = None, family: str | None = None) -> BlockRule:
    rid = rule or default_rule(family)
    if rid not in RULES:
        raise UserError(f"unknown block rule {rid!r}{did_you_mean(rid, RULES)}; choose one of {', '.join(RULES)}", where)
    return RULES[rid]


def block_of(key: str, family: str, rule: str | None = None) -> str | None:
    """The block a tensor belongs to under a rule set (None: the rule set leaves it unmerged)."""
    return get_rule(rule, family=family).block(key, family)


def family_of(arch) -> str | None:
    """Block family ("sd" | "sdxl" | "flux" | "mmdit24" | ...) from an ArchInfo, an architecture id, a ModelSpec
    string or a family name; None when the architecture has no block map."""
    if arch is None:
        return None
    fam = getattr(arch, "family", None)
    if fam is not None or hasattr(arch, "arch"):
        return fam
    a = str(arch)
    if a in FAMILY_BLOCKS:
        return a
    if a in ("sd1", "sd2", "sdxl-refiner") or a.startswith(("stable-diffusion-v1", "stable-diffusion-v2", "stable-diffusion-xl-v1-refiner")):
        return "sd"
    if a == "sdxl" or a.startswith("stable-diffusion-xl"):
        return "sdxl"
    for t in registry.all_architectures():
        if a == t.id or a in t.modelspec.values():
            return t.family
    return None


def is_transformer(family: str | None) -> bool:
    """A block family of arch.models (named blocks, TE/VAE/OTHER outside them), not SD1/SD2/SDXL."""
    return family is not None and family not in SD_FAMILIES and family in FAMILY_BLOCKS


def blocks_for(family: str, *, vae: bool = False) -> tuple[str, ...]:
    """The blocks of a family in list order; with `vae`, every bucket a tensor can fall in (VAE, and for the
    transformer families TE and OTHER)."""
    if is_transformer(family):
        return FAMILY_BLOCKS[family] + ((TE, VAE, blockmap.OTHER) if vae else ())
    return FAMILY_BLOCKS[family] + ((VAE,) if vae else ())


def describe_family(family: str) -> str:
    """`img_in, ..., double_blocks.0-18, ..., final_layer; groups DOUBLE, SINGLE, TE, VAE` (for messages)."""
    if is_transformer(family):
        groups = ", ".join([*blockmap.family_groups(family), TE, VAE])
        return f"{blockmap.summary(family)}; groups {groups}"
    blocks = FAMILY_BLOCKS[family]
    return f"{blocks[0]}, {blocks[1]}..{blocks[-1]}; groups BASE, IN, M, OUT, VAE"


# ---------------------------------------------------------------------------------------------------------------
# presets and weight strings (docs/formats.md §3.4)


@lru_cache(maxsize=None)
def presets() -> dict[str, tuple[float, ...]]:
    """Preset name -> 26 numbers (BASE first), from the shipped supermerger-format preset file."""
    text = resources.files("mergekit_sd.data").joinpath("mbw_presets.txt").read_text()
    out: dict[str, tuple[float, ...]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("preset_name"):
            continue
        name, _, weights = line.partition("\t") if "\t" in line else line.partition(":")
        out[name.strip()] = tuple(float(x) for x in weights.split(","))
    return out


_RANDOM_TOKENS = {"R", "U", "X"}


def parse_number(text: str, where: str | None, what: str = "weight") -> float:
    t = text.strip()
    if t.upper() in _RANDOM_TOKENS:
        raise UserError(f"random {what} token {t!r} is not supported: write the numbers you want (builds must be reproducible)", where)
    try:
        v = float(t)
    except ValueError:
        raise UserError(f"{what} {t!r} is not a number", where) from None
    if v != v or v in (float("inf"), float("-inf")):
        raise UserError(f"{what} {t!r} must be finite", where)
    return v


def parse_weight_string(text: str, where: str | None = None) -> list[float]:
    """supermerger's comma-separated block weights ("0.1,0,0,...")."""
    return [parse_number(p, where) for p in text.replace("\n", ",").split(",") if p.strip()]


def sd_to_sdxl(weights: list[float]) -> list[float]:
    """A 26-value SD list (BASE first) as 20 SDXL values: keep IN00-IN08, M00, OUT00-OUT08 (docs/formats.md §3.1)."""
    base, tail = weights[0], weights[1:26]
    return [base] + tail[0:9] + tail[12:22]


LIST_LENGTHS = {26: "sd", 27: "sd", 20: "sdxl", 21: "sdxl",
                **{len(blockmap.family_blocks(f)): f for f in blockmap.families()}}


def list_lengths_text() -> str:
    """What block lists exist, for messages."""
    t = ", ".join(f"{FAMILY_NAME[f]} {len(FAMILY_BLOCKS[f])} ({blockmap.family_nodes(f)} inputs)" for f in blockmap.families())
    return ("SD1/SD2 take 26 (BASE, IN00-IN11, M00, OUT00-OUT11), SDXL 20 (BASE, IN00-IN08, M00, OUT00-OUT08) or 21 "
            f"with VAE, {t}")


def list_to_blocks(weights: list[float], family: str | None, where: str | None = None) -> dict[str, float]:
    """A list of every block in order -> {block: value} for the model's family (26 -> SDXL converted)."""
    n = len(weights)
    if family is None:
        raise UserError("block weights lists need a known architecture; this model's is unknown, use a number or a "
                        "mapping of `default` and `re:<regex>` selectors", where)
    src = LIST_LENGTHS.get(n)
    if src is None:
        raise UserError(f"block weights list has {n} values; {list_lengths_text()}", where)
    if is_transformer(family) or is_transformer(src):
        if n != len(FAMILY_BLOCKS[family]):
            raise UserError(f"block weights list has {n} values ({FAMILY_NAME[src]} blocks) but this is a "
                            f"{FAMILY_NAME[family]} model, which takes {len(FAMILY_BLOCKS[family])} "
                            f"({blockmap.summary(family) if is_transformer(family) else describe_family(family)})", where)
        return dict(zip(FAMILY_BLOCKS[family], weights))
    vae = weights[-1] if n in (21, 27) else None
    core = list(weights[:-1] if vae is not None else weights)
    if src == "sd" and family == "sdxl":
        core = sd_to_sdxl(core)
    elif src == "sdxl" and family == "sd":
        raise UserError(f"block weights list has {n} values (SDXL blocks) but this is an SD1/SD2 model, which takes 26", where)
    out = dict(zip(FAMILY_BLOCKS[family], core))
    if vae is not None:
        out[VAE] = vae
    return out


# ---------------------------------------------------------------------------------------------------------------
# selectors: default, re:<regex>, block, range, group


_BLOCK_TOKEN = re.compile(r"^(IN|OUT)_?(\d{1,2})$")


def canonical_block(token: str) -> str | None:
    """`IN4`/`IN04` -> `IN04`, `M00`/`MID`/`M0` -> `M00`, `BASE`, `VAE`; None when not a block id (upper case only)."""
    t = token.strip()
    if t in ("BASE", "VAE"):
        return t
    if t in ("M00", "M0", "MID", "MID00", "M_00"):
        return "M00"
    m = _BLOCK_TOKEN.match(t)
    if m:
        b = f"{m.group(1)}{int(m.group(2)):02d}"
        return b if b in _ORDER else None
    return None


_NAMED_TOKEN = re.compile(r"^([a-z_]+)\.(\d{1,3})$")


def canonical_named(token: str) -> str | None:
    """A transformer block name as ComfyUI's merge nodes spell it: `double_blocks.03` and `double_blocks.3.` ->
    `double_blocks.3`, `img_in.` -> `img_in`; None when no registered architecture has such a block."""
    t = token.strip()
    if t.endswith("."):  # the node's input names end with a dot
        t = t[:-1]
    if t in _T_HEADS:
        return t
    m = _NAMED_TOKEN.match(t)
    if m and m.group(1) in _T_STEMS:
        return f"{m.group(1)}.{int(m.group(2))}"
    return None


def _named_range(a: str, b: str, where: str | None) -> tuple[str, str] | None:
    """`double_blocks.0-9` or `double_blocks.0-double_blocks.9` -> the two ends in order; None when not a range of
    named blocks; a UserError for a range across two kinds of block."""
    lo = canonical_named(a)
    if lo is None:
        return None
    lo_n = blockmap.split_numbered(lo)
    hi = f"{lo_n[0]}.{int(b.strip())}" if lo_n is not None and b.strip().isdigit() else canonical_named(b)
    if hi is None:
        return None
    hi_n = blockmap.split_numbered(hi)
    if lo_n is None or hi_n is None or lo_n[0] != hi_n[0]:
        raise UserError(f"block range {a.strip()}-{b.strip()} must stay within one kind of numbered block, e.g. "
                        f"{lo_n[0] if lo_n else 'double_blocks'}.0-9; list the other blocks separately", where)
    return (lo, hi) if lo_n[1] <= hi_n[1] else (hi, lo)


def _span(lo: str, hi: str) -> int:
    if lo in _ORDER:
        return _ORDER[hi] - _ORDER[lo]
    return blockmap.split_numbered(hi)[1] - blockmap.split_numbered(lo)[1]


@dataclass(frozen=True)
class Selector:
    kind: str  # default | regex | vae | block | range | group
    text: str  # canonical spelling
    pattern: re.Pattern | None = None
    lo: str = ""
    hi: str = ""

    def matches(self, key: str, block: str | None, family: str | None) -> bool:
        if self.kind == "default":
            return True
        if self.kind == "regex":
            return bool(self.pattern.search(key))
        if self.kind == "vae":
            return is_vae_key(key) or block == VAE
        if block is None:
            return False
        if self.kind == "block":
            return block == self.text
        if self.kind == "range":
            if self.lo in _ORDER:
                return _ORDER[self.lo] <= _ORDER.get(block, -1) <= _ORDER[self.hi]
            stem, lo = blockmap.split_numbered(self.lo)
            num = blockmap.split_numbered(block)
            return num is not None and num[0] == stem and lo <= num[1] <= blockmap.split_numbered(self.hi)[1]
        if self.kind == "group":
            if self.text in T_GROUPS:
                return block.startswith(T_GROUPS[self.text])
            if self.text == TE:
                return block == TE
            return block == "M00" if self.text == "M" else block.startswith(self.text)
        return False

    @property
    def named(self) -> bool:
        """Needs an architecture with a block map (everything but `default` and `re:`)."""
        return self.kind not in ("default", "regex")

    @property
    def rank(self) -> tuple[int, int]:
        """Specificity: regex, VAE, block, range (narrower first), group, default."""
        if self.kind == "range":
            return (2, -_span(self.lo, self.hi))
        return ({"regex": 5, "vae": 4, "block": 3, "group": 1, "default": 0}[self.kind], 0)

    def check_family(self, family: str, where: str | None) -> None:
        """A UserError when the model's block family has no such block, range end or group."""
        blocks = FAMILY_BLOCKS[family]
        for b in ((self.text,) if self.kind == "block" else (self.lo, self.hi) if self.kind == "range" else ()):
            if b not in blocks:
                raise UserError(f"{FAMILY_NAME[family]} has no block {b} (its blocks: {describe_family(family)})", where)
        if self.kind == "group":
            groups = ({*blockmap.family_groups(family), TE} if is_transformer(family) else {"IN", "M", "OUT"})
            if self.text not in groups:
                raise UserError(f"{FAMILY_NAME[family]} has no group {self.text} (its blocks: {describe_family(family)})", where)


def parse_selector(text: str, where: str | None = None, *, allow_regex: bool = True, allow_default: bool = True,
                   strict: bool = True) -> Selector | None:
    """Parse a block selector; with strict=False, return None for text that is not one (a key substring)."""
    t = str(text).strip()
    if allow_default and t == "default":
        return Selector("default", "default")
    if allow_regex and t.startswith("re:"):
        pat = t[3:]
        try:
            return Selector("regex", "re:" + pat, re.compile(pat))
        except re.error as e:
            raise UserError(f"bad regular expression {pat!r}: {e}", where) from None
    if t in ("IN", "OUT", "M", TE) or t in T_GROUPS:
        return Selector("group", t)
    if t == "VAE":
        return Selector("vae", "VAE")
    if "-" in t:
        a, _, b = t.partition("-")
        lo, hi = canonical_block(a), canonical_block(b)
        if lo and hi and VAE not in (lo, hi):
            if _ORDER[lo] > _ORDER[hi]:
                lo, hi = hi, lo
            return Selector("range", f"{lo}-{hi}", lo=lo, hi=hi)
        ends = _named_range(a, b, where)
        if ends is not None:
            lo, hi = ends
            return Selector("range", f"{lo}-{blockmap.split_numbered(hi)[1]}", lo=lo, hi=hi)
    else:
        b = canonical_block(t) or canonical_named(t)
        if b is not None:
            return Selector("block", b)
    if not strict:
        return None
    choices = ["default", *ALL_GROUPS, *SD_BLOCKS, *sorted(_T_HEADS)]
    m = re.match(r"^([A-Za-z_]+)\.(\d+)\.?$", t)
    if m:  # a numbered block with a misspelt stem: suggest the stem with the same number
        choices += [f"{s}.{int(m.group(2))}" for s in sorted(_T_STEMS)]
    guess = t.upper() if t.upper() in choices or not did_you_mean(t, choices) else t
    hint = did_you_mean(guess, choices)
    for arch in registry.all_architectures():  # a diffusers module name: say which named block it is
        named = arch.diffusers_block_of(t.rstrip(".") + ".") if arch.diffusers_block_of is not None else None
        if named is not None:
            hint = f" ({t} is {arch.title}'s {named} in ComfyUI's block names)"
    raise UserError(f"unknown block selector {t!r}{hint}; use default, a block (IN04, "
                    "double_blocks.3), a range (IN00-IN05, double_blocks.0-9), a group (BASE, IN, M, OUT, DOUBLE, "
                    "SINGLE, JOINT, TE, VAE) or re:<regex>", where)


# ---------------------------------------------------------------------------------------------------------------
# elemental merge (docs/formats.md §3.5)


@dataclass(frozen=True)
class ElementalEntry:
    not_blocks: bool
    blocks: tuple[Selector, ...]
    not_elements: bool
    elements: tuple[str, ...]
    ratio: float

    def text(self) -> str:
        b = ("NOT " if self.not_blocks else "") + " ".join(s.text for s in self.blocks)
        e = ("NOT " if self.not_elements else "") + " ".join(self.elements)
        return f"{b.strip()}:{e.strip()}:{self.ratio!r}"

    def applies(self, key: str, block: str | None, family: str | None) -> bool:
        sel = (not self.blocks) or any(s.matches(key, block, family) for s in self.blocks)
        if self.not_blocks:
            sel = not sel
        if not sel:
            return False
        hit = (not self.elements) or any(e in key for e in self.elements)
        return (not hit) if self.not_elements else hit


def _split_not(tokens: list[str]) -> tuple[bool, list[str]]:
    if tokens and tokens[0] == "NOT":
        return True, tokens[1:]
    return False, tokens


def parse_elemental_entry(text: str, where: str | None = None) -> ElementalEntry:
    if text.count(":") != 2:
        raise UserError(f"elemental entry {text.strip()!r} must be BLOCKS:ELEMENTS:RATIO (two colons)", where)
    blocks_s, elems_s, ratio_s = text.split(":")
    nb, btoks = _split_not(blocks_s.split())
    ne, etoks = _split_not(elems_s.split())
    sels = []
    for tok in btoks:
        s = parse_selector(tok, where, allow_regex=False, allow_default=False)
        sels.append(s)
    return ElementalEntry(nb, tuple(sels), ne, tuple(etoks), parse_number(ratio_s, where, "elemental ratio"))


def normalize_elemental(value, where: str | None = None) -> list[str] | None:
    """supermerger elemental text (entries separated by commas/newlines) or a list of entries -> canonical entries."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = re.split(r"[,\n]", value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = [p for v in value for p in re.split(r"[,\n]", v)]
    else:
        raise UserError("elemental must be a string of BLOCKS:ELEMENTS:RATIO entries or a list of them", where)
    entries = [parse_elemental_entry(p, where).text() for p in parts if p.strip()]
    return entries or None


def compile_elemental(entries: list[str] | None, family: str | None, where: str | None = None) -> list[ElementalEntry]:
    out = []
    for text in entries or ():
        e = parse_elemental_entry(text, where)
        if e.blocks and family is None:
            raise UserError("elemental block names need a known architecture with a block map (SD1, SD2, SDXL, "
                            "Flux.1, SD3/SD3.5)", where)
        for s in e.blocks:
            if family is not None:
                s.check_family(family, where)
        out.append(e)
    return out


def elemental_value(entries: list[ElementalEntry], key: str, block: str | None, family: str | None, alpha: float) -> float:
    """Start from the block alpha; every entry that selects the key sets it; later entries win."""
    for e in entries:
        if e.applies(key, block, family):
            alpha = e.ratio
    return alpha


# ---------------------------------------------------------------------------------------------------------------
# include / exclude (docs/formats.md §3.6)

ADJUST_KEYS = tuple(UNET + k for k in ("input_blocks.0.0.weight", "input_blocks.0.0.bias", "out.0.weight", "out.0.bias",
                                       "out.2.weight", "out.2.bias"))


def normalize_inex(value, where: str | None = None) -> list[str] | None:
    """A list (or comma string) of block selectors, `Adjust`, `re:<regex>` or key substrings -> sorted canonical list."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [p.strip() for v in value for p in v.split(",")]
    else:
        raise UserError("expected a list of blocks (IN04, IN00-IN05, OUT, VAE) or key substrings", where)
    out = set()
    for it in items:
        if not it:
            continue
        if it == "Adjust":
            out.add(it)
            continue
        s = parse_selector(it, where, allow_default=False, strict=False)
        out.add(s.text if s is not None else it)
    return sorted(out) or None


@dataclass(frozen=True)
class InEx:
    items: tuple[tuple[Selector | None, str], ...]

    def matches(self, key: str, block: str | None, family: str | None) -> bool:
        for sel, text in self.items:
            if text == "Adjust":
                if key in ADJUST_KEYS:
                    return True
            elif sel is None:
                if text in key:
                    return True
            elif sel.matches(key, block, family):
                return True
        return False


def compile_inex(items: list[str] | None, family: str | None, where: str | None = None) -> InEx | None:
    if not items:
        return None
    out = []
    for it in items:
        sel = None if it == "Adjust" else parse_selector(it, where, allow_default=False, strict=False)
        if sel is not None and sel.kind in ("block", "range", "group") and family is None:
            raise UserError(f"block {it!r} needs a known architecture with a block map (SD1, SD2, SDXL, Flux.1, "
                            "SD3/SD3.5); use re:<regex> or a tensor-name substring", where)
        if sel is not None and family is not None:
            sel.check_family(family, where)
        out.append((sel, it))
    return InEx(tuple(out))


def merged_by_inex(include: InEx | None, exclude: InEx | None, key: str, block: str | None, family: str | None) -> bool:
    """Include: only matching tensors are merged; exclude: matching tensors keep the first model's values."""
    if include is not None and not include.matches(key, block, family):
        return False
    if exclude is not None and exclude.matches(key, block, family):
        return False
    return True


def describe_blocks(family: str) -> str:
    return ", ".join(blocks_for(family))


def all_rules() -> Iterable[BlockRule]:
    return RULES.values()
