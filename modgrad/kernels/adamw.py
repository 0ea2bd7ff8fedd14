"""Host-side coefficients of the fused AdamW kernel."""

from __future__ import annotations

import numpy as np


def adamw_hyper(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    clip_scale: float = 1.0,
) -> np.ndarray:
    """Return the (8,) float32 coefficients the ``adamw_fused`` kernel reads, computed in float64.

    Layout: clip_scale, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay,
    lr / (1 - beta1**step), sqrt(1 - beta2**step), eps.
    """
    if step < 1:
        raise ValueError(f"adamw_hyper: step must be >= 1 (the first step is 1), got {step}")
    values = [
        clip_scale,
        1 - beta1,
        beta2,
        1 - beta2,
        1 - lr * weight_decay,
        lr / (1 - beta1**step),
        np.sqrt(1 - beta2**step),
        eps,
    ]
    return np.array(values, dtype=np.float64).astype(np.float32)
