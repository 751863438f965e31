"""Families of `SubmodelSpec`s: all of them (when few), wide-narrow-wide over a stack, random samples."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import keras

from matta_tf.extraction.extract import is_extractable
from matta_tf.extraction.spec import SpecError, SubmodelSpec, choosable_layers

MAX_EXHAUSTIVE = 4096


def all_specs(model: keras.Model, limit: int = MAX_EXHAUSTIVE) -> list[SubmodelSpec]:
    """Every combination of choices (2^n for n choosable layers), if there are at most `limit`."""
    names = [layer.name for layer in choosable_layers(model)]
    if 2 ** len(names) > limit:
        raise SpecError(
            f"'{model.name}' has {len(names)} choosable layers: {2 ** len(names)} specs is more than "
            f"`limit`={limit}. Use `wide_narrow_wide_specs` or `random_specs`."
        )
    specs = []
    for combination in itertools.product(("student", "ta"), repeat=len(names)):
        label = "".join("S" if c == "student" else "T" for c in combination)
        specs.append(SubmodelSpec(dict(zip(names, combination, strict=True)), name=label))
    return specs


def wide_narrow_wide_specs(
    model: keras.Model,
    stack: Sequence[str],
    ks: Sequence[int] | None = None,
    rest: str = "student",
) -> list[SubmodelSpec]:
    """The paper's *wide-narrow-wide* family over a stack of identical blocks (section 4.2.3).

    For K = 0, 2, 4, ... (or `ks`) the lowest K/2 and the top K/2 blocks of `stack` are taken at the
    TA's width and the middle ones at the Student's. Blocks may be several layers each: pass a list of
    per-block layer-name groups joined by commas (e.g. `"block_3_ffn,ta_block_3"`).

    Args:
        model: The nested model.
        stack: Block names from bottom to top; each entry names one or more choosable layers
            (comma-separated) that move together.
        ks: Numbers of wide blocks. Defaults to 0, 2, ..., len(stack).
        rest: Choice for choosable layers outside the stack. Defaults to `"student"`.

    Returns:
        One spec per K, named `"wnw-K"`.
    """
    groups = [[name.strip() for name in entry.split(",") if name.strip()] for entry in stack]
    known = {layer.name for layer in choosable_layers(model)}
    for group in groups:
        for name in group:
            if name not in known:
                raise SpecError(f"stack layer {name!r} is not a choosable layer of '{model.name}'")
    n = len(groups)
    ks = list(range(0, n + 1, 2)) if ks is None else list(ks)
    base = SubmodelSpec.uniform(model, rest)
    specs = []
    for k in ks:
        if k % 2 or not 0 <= k <= n:
            raise SpecError(f"`ks` must hold even numbers in [0, {n}]. Received: {k!r}")
        wide = set(range(k // 2)) | set(range(n - k // 2, n))
        choices = {name: ("ta" if i in wide else "student") for i, group in enumerate(groups) for name in group}
        specs.append(base.replace(name=f"wnw-{k}", **choices))
    return specs


def random_specs(
    model: keras.Model,
    count: int,
    seed: int = 0,
    include_ends: bool = True,
    extractable_only: bool = True,
    mixed_only: bool = False,
) -> list[SubmodelSpec]:
    """`count` distinct random specs (uniform choice per layer), plus the Student and the TA if asked.

    Args:
        model: The nested model.
        count: Number of random specs (fewer when the model has fewer distinct extractable specs).
        seed: Seed of the draws.
        include_ends: Whether the Student and the TA specs come first (not counted in `count`).
        extractable_only: Whether to skip draws that `extract_submodel` refuses (e.g. a TA-only layer
            kept after a layer at Student width): each draw is checked by extracting it. Defaults to
            `True`.
        mixed_only: Whether to skip draws that are the Student or the TA (every layer at one choice),
            e.g. for training the mixed sizes (`matta_tf.training.Sandwich`). Defaults to `False`.

    Returns:
        The specs, the ends first, then `random-<n>` in draw order.
    """
    names = [layer.name for layer in choosable_layers(model)]
    rng = random.Random(seed)
    specs: dict[tuple, SubmodelSpec] = {}
    if include_ends:
        for choice in ("student", "ta"):
            specs[(choice,) * len(names)] = SubmodelSpec.uniform(model, choice)
    rejected: set[tuple] = set()
    attempts = 0
    while len(specs) < count + (2 if include_ends else 0) and attempts < 100 * max(count, 1):
        attempts += 1
        combination = tuple(rng.choice(("student", "ta")) for _ in names)
        if combination in specs or combination in rejected:
            continue
        if mixed_only and len(set(combination)) < 2:
            rejected.add(combination)
            continue
        spec = SubmodelSpec(dict(zip(names, combination, strict=True)), name=f"random-{len(specs)}")
        if extractable_only and not is_extractable(model, spec):
            rejected.add(combination)
            continue
        specs[combination] = spec
    return list(specs.values())
