"""Train / validation / test splits in time order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validates three positive fractions summing to 1 (train, validation, test); returns them as floats."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"`split_fractions` must be three positive fractions summing to 1. Received: split_fractions={fractions!r}"
        )
    return values


def split_by_time(timestamps: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split names by time: cut points at the fractions' quantiles; equal timestamps share a split."""
    ordered = np.sort(timestamps)
    first_cut = ordered[min(int(len(ordered) * fractions[0]), len(ordered) - 1)]
    second_cut = ordered[min(int(len(ordered) * (fractions[0] + fractions[1])), len(ordered) - 1)]
    return np.where(timestamps < first_cut, SPLITS[0], np.where(timestamps < second_cut, SPLITS[1], SPLITS[2]))
