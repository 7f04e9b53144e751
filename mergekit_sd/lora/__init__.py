"""LoRA and LyCORIS support: parsing every format into a canonical form, ΔW math, strengths, synthetic files."""

from mergekit_sd.lora.delta import compute_delta, delta_shape, module_scale  # noqa: F401
from mergekit_sd.lora.formats import Module, ParsedLora, declared_arch, parse_lora  # noqa: F401
