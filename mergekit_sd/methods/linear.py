"""The general linear merge: any number of models, one weight per model, each a number or block weights.

Every affine merge (weighted sum, add difference, triple sum, sum twice, MBW) is a special case; `sdbuild fit`
writes this op when no simpler one expresses the weights it recovered.
"""

from __future__ import annotations

import torch

from mergekit_sd.methods import merge_method


@merge_method(formula="w1*M1 + w2*M2 + ... + wn*Mn  (weights: one per model, each a number or block weights)",
              elementwise=True, docs={"weights": "one weight per model, in the order of models; each a number or block weights"})
def linear(m1: torch.Tensor, *models: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum of any number of models with free weights (they need not sum to 1)."""
    out = m1 * weights[0]
    for m, w in zip(models, weights[1:]):
        out += m * w
    return out
