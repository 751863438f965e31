"""Raw features to model-ready tensors: lookups, bucketization and padding, as one Keras layer.

`FeaturePreprocessor` runs every lookup of a schema. It is kept apart from the network so that the
network is pure dense math (it compiles with XLA, `jit_compile=True`: hash-table lookups and ragged
tensors do not), while the exported serving model chains the two, so TF Serving takes raw ids and
strings and needs no Python.

Its outputs are keyed by `preprocessed_name(feature)`, never by the raw feature's name: a network
built on them (`matta_tf.models.relevance`) cannot be fed a raw batch by mistake. A raw id that
happens to lie inside an embedding table would otherwise train silently on the wrong row; this way
the call fails at once, naming the input (`Missing data for input "user_id_index"`).

Output per model feature (metadata features are dropped):
- categorical and bucketized numeric: `"<name>_index"`, int32 indices, shape `(batch,)`, in
  `[0, cardinality)`;
- multi-valued: `"<name>_index"`, int32 indices, shape `(batch, max_length)`: index `k + 1` for
  lookup index `k` and 0 for padding (the last `max_length` values are kept, the rest padded on the
  right);
- raw numeric: `"<name>_scaled"`, float32 `(x - mean) / std` (identity without them), shape
  `(batch, shape)`.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from matta_tf.data.schema import Feature, Schema
from matta_tf.data.vocabulary import lookup_layer

DEFAULT_MAX_LENGTH = 16
PADDING_INDEX = 0
INDEX_SUFFIX = "_index"
SCALED_SUFFIX = "_scaled"


def preprocessed_name(feature: Feature) -> str:
    """The key of `feature`'s preprocessed tensor: `"<name>_index"` (indices) or `"<name>_scaled"` (floats)."""
    is_index = feature.is_categorical or feature.boundaries is not None
    return feature.name + (INDEX_SUFFIX if is_index else SCALED_SUFFIX)


def padded_length(feature: Feature) -> int:
    """Number of values a multi-valued feature is padded or truncated to."""
    return feature.max_length or DEFAULT_MAX_LENGTH


def embedding_rows(feature: Feature) -> int:
    """Rows an embedding table needs for the preprocessed feature (one extra for padding if multi-valued)."""
    return feature.cardinality + (1 if feature.is_multi_valued else 0)


@keras.saving.register_keras_serializable(package="matta_tf")
class FeaturePreprocessor(keras.layers.Layer):
    """Maps a dict of raw feature tensors to model-ready tensors (see the module docstring).

    Args:
        schema: The schema of the raw features (a `Schema` or its `to_dict()` form).
        **kwargs: Args passed to `keras.layers.Layer`.

    Example:

    ```python
    from matta_tf.data import make_dataset

    preprocessor = FeaturePreprocessor(schema)
    dataset = make_dataset(f"{data_dir}/train", schema, 512, labels="label")
    dataset = dataset.map(lambda x, y: (preprocessor(x), y))
    features, labels = next(iter(dataset))   # model-ready tensors, one per model feature
    assert set(features) == {preprocessed_name(feature) for feature in schema.model_features}
    assert features["user_id_index"].dtype == tf.int32           # raw "user_id" -> its lookup index
    ```

    Raises:
        ValueError: a preprocessed name equals a raw feature's name in the schema (say features `"x"`
            and `"x_index"`), which would let a raw batch bind to the network's inputs.
    """

    def __init__(self, schema: Schema | dict, **kwargs: Any) -> None:
        super().__init__(trainable=False, **kwargs)
        self.schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
        self.features = self.schema.model_features
        raw_names = {f.name for f in self.schema.features}
        for feature in self.features:
            if preprocessed_name(feature) in raw_names:
                raise ValueError(
                    f"FeaturePreprocessor: feature {feature.name!r} is preprocessed to "
                    f"{preprocessed_name(feature)!r}, which is also the name of a raw feature of the schema; a raw "
                    "batch could then bind to a network input. Rename one of them."
                )
        self.lookups = {
            f.name: lookup_layer(f, name=f"{f.name}_lookup")
            for f in self.features
            if f.is_categorical or f.boundaries is not None
        }

    def call(self, inputs: dict[str, Any]) -> dict[str, Any]:
        outputs = {}
        for feature in self.features:
            if feature.name not in inputs:
                raise KeyError(f"missing feature {feature.name!r}; the schema has {[f.name for f in self.features]}")
            value = inputs[feature.name]
            key = preprocessed_name(feature)
            if feature.is_multi_valued:
                outputs[key] = self._pad(feature, value)
            elif feature.name in self.lookups:
                outputs[key] = tf.cast(self.lookups[feature.name](tf.reshape(value, [-1])), tf.int32)
            else:
                value = tf.reshape(tf.cast(value, tf.float32), [-1, feature.shape])
                if feature.mean is not None:
                    value = value - feature.mean
                if feature.std is not None:
                    value = value / feature.std
                outputs[key] = value
        return outputs

    def _pad(self, feature: Feature, value: Any) -> tf.Tensor:
        length = padded_length(feature)
        if not isinstance(value, tf.RaggedTensor):
            # A dense (batch, n) tensor from a serving request: empty strings / negative ids are padding.
            value = tf.convert_to_tensor(value)
            if value.shape.rank == 1:
                value = tf.expand_dims(value, 1)
            present = tf.not_equal(value, "") if value.dtype == tf.string else tf.greater_equal(value, 0)
            value = tf.ragged.boolean_mask(value, present)
        value = value[:, -length:]
        indices = tf.ragged.map_flat_values(lambda v: tf.cast(self.lookups[feature.name](v), tf.int32) + 1, value)
        return indices.to_tensor(default_value=PADDING_INDEX, shape=[None, length])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("trainable", None)
        config["schema"] = self.schema.to_dict()
        return config
