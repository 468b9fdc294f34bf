"""Response validation for the load test (no locust import: usable from tests and tools)."""

from __future__ import annotations

import itertools


def validate(body: dict, classes: set[str], n_images: int, top_k: int) -> str | None:
    """None when the answer is well formed, else what is wrong."""
    preds = body.get("predictions")
    if preds is None:
        return "no predictions"
    lists = preds if n_images > 1 or (preds and isinstance(preds[0], list)) else [preds]
    if len(lists) != n_images:
        return f"{len(lists)} prediction lists for {n_images} images"
    for p in lists:
        if not p or (top_k and len(p) != top_k):
            return f"expected {top_k} predictions, got {len(p) if p else 0}"
        scores = [x.get("score") for x in p]
        if any(not isinstance(s, int | float) or not 0.0 <= s <= 1.0 for s in scores):
            return f"scores outside [0, 1]: {scores[:3]}"
        if any(a < b for a, b in itertools.pairwise(scores)):
            return "scores not sorted"
        total = sum(scores)
        if total > 1.0 + 1e-3 or (len(p) == len(classes) and abs(total - 1.0) > 1e-3):
            return f"scores do not form a probability distribution (sum {total:.4f})"
        bad = [x.get("label") for x in p if x.get("label") not in classes]
        if bad:
            return f"unknown labels {bad[:3]}"
    return None
