"""Regenerate the Flux and SD3/3.5 reference key lists in mergekit_sd/data/keys/ (docs/architectures.md).

    python tools/make_reference_keys.py PATH/TO/sd_mecha/extensions/builtin/model_configs

Flux.1 (all components) and SD3 medium's text encoders and VAE are copied from sd-mecha's shipped model configs
(`flux-flux.yaml`, `sd3-comfyui.yaml`; MIT licence). The MMDiT diffusion models are generated from their published
hyperparameters, and the SD3 medium one is checked against sd-mecha's list, so the generator is known to be right
where a public list exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent.parent / "mergekit_sd" / "data" / "keys"
P = "model.diffusion_model."


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    out = {}
    for comp, entries in doc["components"].items():
        out[comp] = {}
        for k, e in entries.items():
            d = {"shape": list(e["shape"]), "dtype": e["dtype"]}
            if e.get("optional") or k.endswith("logit_scale"):
                d["optional"] = True
            out[comp][k] = d
    return out


def mmdit(depth: int, pos_max: int, qk_norm: bool, attn2_blocks: int = 0, dtype: str = "float32") -> dict:
    """MMDiT / MMDiT-X keys (SD3 `mmdit.py`): hidden = 64 * depth, 16 latent channels, patch 2, 4x MLP."""
    h = 64 * depth
    out: dict[str, dict] = {}

    def add(name: str, *shape: int) -> None:
        out[P + name] = {"shape": list(shape), "dtype": dtype}

    add("pos_embed", 1, pos_max * pos_max, h)
    add("x_embedder.proj.weight", h, 16, 2, 2)
    add("x_embedder.proj.bias", h)
    for emb, width in (("t_embedder", 256), ("y_embedder", 2048)):
        add(f"{emb}.mlp.0.weight", h, width)
        add(f"{emb}.mlp.0.bias", h)
        add(f"{emb}.mlp.2.weight", h, h)
        add(f"{emb}.mlp.2.bias", h)
    add("context_embedder.weight", h, 4096)
    add("context_embedder.bias", h)
    for i in range(depth):
        for part in ("x_block", "context_block"):
            pre_only = part == "context_block" and i == depth - 1
            attn2 = part == "x_block" and i < attn2_blocks
            b = f"joint_blocks.{i}.{part}."
            n = 2 if pre_only else 9 if attn2 else 6
            add(b + "adaLN_modulation.1.weight", n * h, h)
            add(b + "adaLN_modulation.1.bias", n * h)
            for attn in ("attn", "attn2") if attn2 else ("attn",):
                add(b + f"{attn}.qkv.weight", 3 * h, h)
                add(b + f"{attn}.qkv.bias", 3 * h)
                if not pre_only:
                    add(b + f"{attn}.proj.weight", h, h)
                    add(b + f"{attn}.proj.bias", h)
                if qk_norm:
                    add(b + f"{attn}.ln_q.weight", 64)
                    add(b + f"{attn}.ln_k.weight", 64)
            if not pre_only:
                add(b + "mlp.fc1.weight", 4 * h, h)
                add(b + "mlp.fc1.bias", 4 * h)
                add(b + "mlp.fc2.weight", h, 4 * h)
                add(b + "mlp.fc2.bias", h)
    add("final_layer.linear.weight", 64, h)
    add("final_layer.linear.bias", 64)
    add("final_layer.adaLN_modulation.1.weight", 2 * h, h)
    add("final_layer.adaLN_modulation.1.bias", 2 * h)
    return dict(sorted(out.items()))


def _write(name: str, arch: str, components: dict) -> None:
    doc = {"architecture": arch, "source": components.pop("_source"),
           "components": {c: dict(sorted(e.items())) for c, e in components.items()}}
    (OUT / name).write_text(json.dumps(doc, indent=0, sort_keys=False) + "\n")
    print(name, {c: len(e) for c, e in doc["components"].items()})


def main(configs: str) -> None:
    folder = Path(configs)
    flux = _load(folder / "flux-flux.yaml")
    flux["diffuser"] = {k: e for k, e in flux["diffuser"].items()}
    for k in flux["diffuser"]:
        if ".guidance_in." in k:  # Flux.1-schnell has no guidance embedder
            flux["diffuser"][k]["optional"] = True
    flux["_source"] = "sd-mecha 1.1.8 model_configs/flux-flux.yaml"
    _write("flux.json", "flux", flux)

    sd3 = _load(folder / "sd3-comfyui.yaml")
    # ComfyUI's saved sampling schedule, not a weight: kept as an optional key (loaders rebuild it)
    sigmas = sd3["diffuser"].pop("model.model_sampling.sigmas")
    generated = mmdit(24, 192, False)
    assert {k: e["shape"] for k, e in generated.items()} == {k: e["shape"] for k, e in sd3["diffuser"].items()}, \
        "MMDiT generator disagrees with sd-mecha's SD3 medium list"
    sd3["diffuser"]["model.model_sampling.sigmas"] = dict(sigmas, optional=True)
    te_vae = {c: e for c, e in sd3.items() if c != "diffuser"}
    _write("sd3-medium.json", "sd3", dict(te_vae, diffuser=sd3["diffuser"], _source="sd-mecha 1.1.8 model_configs/sd3-comfyui.yaml"))
    _write("sd35-large.json", "sd35l", dict(te_vae, diffuser=mmdit(38, 192, True),
                                            _source="generated (MMDiT depth 38, qk_norm rms); text encoders and VAE from sd-mecha sd3-comfyui.yaml"))
    _write("sd35-medium.json", "sd35m", dict(te_vae, diffuser=mmdit(24, 384, True, attn2_blocks=13),
                                             _source="generated (MMDiT-X depth 24, qk_norm rms, attn2 in blocks 0-12, pos_embed_max_size 384); text encoders and VAE from sd-mecha sd3-comfyui.yaml"))


if __name__ == "__main__":
    main(sys.argv[1])
