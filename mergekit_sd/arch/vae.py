"""VAE identity: the fingerprint that names well-known VAEs (SD-v1's kl-f8, SD-v2's, NAI's, WD's).

`inspect` reports the fingerprint and the `vae` op records which VAE it baked in.
"""

from __future__ import annotations

import torch

from mergekit_sd.lazy import LazyModel

KNOWN_VAE_FINGERPRINTS = {0: "SD-v1 (kl-f8)", 869: "SD-v2", 2982: "NAI", 155: "WD-VAE-v1", 41: "WD-VAE-v2"}


def vae_fingerprint(model: LazyModel, vae_keys: list[str]) -> int | None:
    """The model toolkit's VAE "metric" (docs/formats.md §1.7): identifies well-known VAEs (SD-v1 0, NAI 2982, ...)."""
    total = 0.0
    seen = False
    for k in vae_keys:
        if ("encoder." in k or "decoder." in k) and model.spec(k).dtype.is_floating_point:
            t = model.get(k).to(torch.float16).to(torch.float32)
            total += float((torch.sigmoid(t) - 0.5).sum(dtype=torch.float64))
            seen = True
    if not seen:
        return None
    n = int(abs(total / 17870.7051 - 1) * 10000)
    while n >= 10000:
        n -= 5000
    return n


def known_vae(fingerprint: int | None) -> str | None:
    """The well-known VAE a fingerprint belongs to (within 1, for rounding), or None."""
    if fingerprint is None:
        return None
    return next((n for v, n in KNOWN_VAE_FINGERPRINTS.items() if abs(fingerprint - v) <= 1), None)
