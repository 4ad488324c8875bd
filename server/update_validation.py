"""Checks on a site's training reply before it may touch the global model.

A reply is rejected, with its reason, when its arrays are not exactly the trainable state the
server sent (the same keys, shapes and dtypes), hold NaN or Inf, or move the model further than
the configured bound; or when its example count (its weight in the average) is not a
non-negative finite number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def update_problem(
    sent: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    *,
    max_update_norm: float = 0.0,
    bound_name: str = "fed.max-update-norm",
) -> str | None:
    """Why the reply must not be aggregated, or None when it may."""
    missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
    if missing or extra:
        return f"wrong keys: missing {_few(missing)}, unexpected {_few(extra)}"
    for key, expected in sent.items():
        got = received[key]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return f"{key}: {got.dtype}{list(got.shape)} where {expected.dtype}{list(expected.shape)} was sent"
        if not np.isfinite(got).all():
            return f"{key}: holds NaN or Inf"
    weight = metrics.get("num-examples")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return f"num-examples is {weight!r}, expected a non-negative number"
    if max_update_norm > 0:
        norm = update_norm(sent, received)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} is above the bound {bound_name} = {max_update_norm:g}"
    return None


def update_norm(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the whole update, over every array (in float64, so a large update cannot overflow)."""
    return math.sqrt(sum(float(np.sum((received[k].astype(np.float64) - sent[k].astype(np.float64)) ** 2)) for k in sent))


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
