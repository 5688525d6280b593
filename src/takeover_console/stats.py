"""Small statistics shared by the client, the model and the benchmarks."""

from __future__ import annotations

from typing import Iterable


def percentile(values: Iterable[float], pct: float) -> float | None:
    """Nearest-rank percentile of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]
