"""Preprocessing layers that `mnestify` keeps shared (un-nested) and extraction copies with their state.

A Keras Student often starts with its own preprocessing: `StringLookup` / `IntegerLookup` ->
`Embedding`, `Hashing`, `Discretization`, `Normalization`. These layers have no width to nest: both
streams read the same output. `mnestify` puts a copy of each (same configuration, vocabulary,
mean/variance, bin boundaries) into the nested network, and extraction copies it again into every
extracted Student, so the extracted plain model computes exactly what the nested one does and a
SavedModel export of it carries the vocabulary.

The copy follows Keras' own `.keras` loading: `from_config(get_config())`, `build_from_config`,
then `load_own_variables` with the layer's `save_own_variables` store (Normalization's mean and
variance) and `load_assets` with its `save_assets` files (an adapted lookup's vocabulary).
"""

from __future__ import annotations

import tempfile
from typing import Any

import keras

SHARED_PREPROCESSING_LAYERS = (
    keras.layers.StringLookup,
    keras.layers.IntegerLookup,
    keras.layers.Hashing,
    keras.layers.Discretization,
    keras.layers.Normalization,
)


def is_shared_preprocessing(layer: Any) -> bool:
    """Whether `layer` is a preprocessing layer that `mnestify` keeps shared (see the module docstring)."""
    return isinstance(layer, SHARED_PREPROCESSING_LAYERS)


def copy_preprocessing_layer(layer: keras.layers.Layer, name: str | None = None) -> keras.layers.Layer:
    """A new layer of `layer`'s class with its configuration and state (vocabulary, mean/variance, ...).

    Args:
        layer: one of `SHARED_PREPROCESSING_LAYERS` (adapted, configured, or built from a vocabulary file).
        name: the copy's name. Defaults to `layer.name`.

    Returns:
        The copy, built if `layer` is, computing the same outputs on the same inputs.

    Raises:
        ValueError: `layer` is not one of `SHARED_PREPROCESSING_LAYERS` (names it and its class).
    """
    if not is_shared_preprocessing(layer):
        supported = ", ".join(cls.__name__ for cls in SHARED_PREPROCESSING_LAYERS)
        raise ValueError(
            f"copy_preprocessing_layer: layer '{layer.name}' is a {layer.__class__.__name__}; it copies "
            f"{supported} only."
        )
    config = dict(layer.get_config())
    config["name"] = name or layer.name
    copy = layer.__class__.from_config(config)
    build_config = layer.get_build_config() if layer.built else None
    if build_config:
        copy.build_from_config(build_config)
    store: dict[str, Any] = {}
    layer.save_own_variables(store)
    if store:
        copy.load_own_variables(store)
    if hasattr(layer, "save_assets"):
        with tempfile.TemporaryDirectory() as assets:
            layer.save_assets(assets)
            copy.load_assets(assets)
    return copy
