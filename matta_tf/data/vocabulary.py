"""Vocabularies built from training data, and the Keras layers that map raw values to indices.

Lookups live inside the model (Keras preprocessing layers), so an exported SavedModel takes raw ids
and strings and serving needs no Python. Index layout of a vocabulary lookup: `[0, num_oov_buckets)`
are the out-of-vocabulary buckets, then the vocabulary in order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import keras

from matta_tf.data.schema import Feature, SchemaError


def build_vocabulary(values: Iterable, min_count: int = 1, max_size: int | None = None) -> tuple:
    """Distinct values seen at least `min_count` times, most frequent first (ties: smallest value first).

    Multi-valued inputs (lists, tuples) are flattened. Deterministic for the same multiset of values.
    """
    counts: Counter = Counter()
    for value in values:
        if isinstance(value, (list, tuple)):
            counts.update(value)
        else:
            counts[value] += 1
    ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
    if max_size is not None:
        ranked = ranked[:max_size]
    return tuple(value.item() if hasattr(value, "item") else value for value, _ in ranked)


def lookup_layer(feature: Feature, name: str | None = None) -> keras.layers.Layer:
    """A Keras layer mapping the raw values of `feature` to indices in `[0, feature.cardinality)`.

    Vocabulary features use `IntegerLookup`/`StringLookup` (unknown values go to the OOV buckets),
    hashed features use `Hashing`, bucketized numeric features use `Discretization`.
    """
    name = name or f"{feature.name}_lookup"
    if feature.vocabulary is not None:
        layer_class = keras.layers.IntegerLookup if feature.dtype == "int64" else keras.layers.StringLookup
        return layer_class(
            vocabulary=list(feature.vocabulary), num_oov_indices=feature.num_oov_buckets, mask_token=None, name=name
        )
    if feature.num_hash_buckets is not None:
        return keras.layers.Hashing(num_bins=feature.num_hash_buckets, name=name)
    if feature.boundaries is not None:
        return keras.layers.Discretization(bin_boundaries=list(feature.boundaries), name=name)
    raise SchemaError(f"feature {feature.name!r} is raw numeric: it has no lookup (standardize it instead)")
