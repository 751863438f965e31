"""The reference relevance model: user, context and item towers, a cross interaction, and a head.

The Student is a production-style ranking model over a `Schema`: every categorical feature is
embedded (multi-valued ones averaged), each role (user, context, item) has an MLP tower, the
towers' outputs are crossed (DCN-v2) and a head MLP gives the logit(s). Its M-nested Student+TA
network is built from matta-tf's nested layers: d_model nesting of every embedding, width nesting of
every hidden layer, and optional TA-only (depth-nested) blocks after the cross layers.

The network reads the `FeaturePreprocessor`'s output (indices and floats): it is pure dense math and
compiles with `jit_compile=True`. `relevance_preprocessor(schema)` gives the preprocessor to map in
`tf.data` and to chain in front of the network for serving. The network's inputs are named as the
preprocessor's outputs (`"user_id_index"`; a bucketized `history_count` is `"history_count_index"`, see
`matta_tf.data.preprocessing.preprocessed_name`), never as the raw features, so a raw batch (say
`make_dataset`'s output fed by mistake) fails at once with `Missing data for input
"user_id_index"`, even where its raw ids would fall inside the embedding tables.

Example:

```python
from matta_tf.data import parse_examples

schema = Schema.load(data_dir)                  # e.g. runs/movielens/data
config = RelevanceConfig(embedding_dim=16, tower_units=(64, 32), ta_width_multiplier=4)
network = build_relevance_network(schema, config)         # features -> (student_logit, ta_logit)
student_only = build_relevance_network(schema, config.student_config())
features = relevance_preprocessor(schema)(parse_examples(tf.constant(records), schema, labels=False))
student_logit, ta_logit = network(features)               # (32, 1) each
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras

from matta_tf.data.preprocessing import FeaturePreprocessor, embedding_rows, padded_length, preprocessed_name
from matta_tf.data.schema import Feature, Schema
from matta_tf.layers.nested_concatenate import NestedConcatenate
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_embedding import NestedEmbedding
from matta_tf.layers.nested_feature_cross import NestedFeatureCross
from matta_tf.layers.ta_only import TAOnly

ROLES = ("user", "context", "item")


class ConfigError(ValueError):
    """A model configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RelevanceConfig:
    """Sizes of the Student relevance model and of the TA it is M-nested into.

    Args:
        embedding_dim: Student embedding width of every feature. Defaults to 16.
        tower_units: Student hidden widths of each role's tower. Defaults to `(64, 32)`.
        num_cross_layers: DCN-v2 cross layers over the concatenated towers. Defaults to 1.
        head_units: Student hidden widths of the head MLP. Defaults to `(64, 32)`.
        num_logits: Output width: 1 for a binary task, C for C classes. Defaults to 1.
        ta_embedding_multiplier: TA embedding width = Student's times this (d_model nesting).
            Defaults to 4.
        ta_width_multiplier: TA hidden widths = Student's times this. Defaults to 4.
        ta_only_blocks: Residual Dense blocks that only the TA runs (depth nesting), after the first
            head layer. Defaults to 0.
        student_init: `"standalone"` (default): each Student sub-block is initialized exactly as a
            standalone Student's layer; `"ta_slice"`: Student blocks are slices of a TA-shaped
            init (the control that an earlier MovieLens measurement needed).
    """

    embedding_dim: int = 16
    tower_units: tuple[int, ...] = (64, 32)
    num_cross_layers: int = 1
    head_units: tuple[int, ...] = (64, 32)
    num_logits: int = 1
    ta_embedding_multiplier: float = 4.0
    ta_width_multiplier: float = 4.0
    ta_only_blocks: int = 0
    student_init: str = "standalone"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tower_units", tuple(int(u) for u in self.tower_units))
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        for field in ("embedding_dim", "num_logits"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"`{field}` must be >= 1. Received: {field}={getattr(self, field)!r}")
        for field in ("num_cross_layers", "ta_only_blocks"):
            if int(getattr(self, field)) < 0:
                raise ConfigError(f"`{field}` must be >= 0. Received: {field}={getattr(self, field)!r}")
        if self.ta_only_blocks and not self.head_units:
            raise ConfigError(f"`ta_only_blocks` needs `head_units`. Received: ta_only_blocks={self.ta_only_blocks}")
        for field in ("tower_units", "head_units"):
            if any(u < 1 for u in getattr(self, field)):
                raise ConfigError(f"`{field}` must be positive widths. Received: {field}={getattr(self, field)!r}")
        for field in ("ta_embedding_multiplier", "ta_width_multiplier"):
            if float(getattr(self, field)) < 1.0:
                raise ConfigError(
                    f"`{field}` must be >= 1 (the TA is no narrower than the Student). "
                    f"Received: {field}={getattr(self, field)!r}"
                )
        if self.student_init not in ("standalone", "ta_slice"):
            raise ConfigError(
                f"`student_init` must be 'standalone' or 'ta_slice'. Received: student_init={self.student_init!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelevanceConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field {unknown[0]!r}. Known fields: {sorted(known)}")
        return cls(**data)

    def ta_width(self, student_width: int) -> int:
        return max(student_width, int(round(student_width * self.ta_width_multiplier)))

    @property
    def ta_embedding_dim(self) -> int:
        return max(self.embedding_dim, int(round(self.embedding_dim * self.ta_embedding_multiplier)))

    def student_config(self) -> RelevanceConfig:
        """The Student alone: a network whose TA stream is the Student (baseline, no sharing)."""
        return dataclasses.replace(self, ta_embedding_multiplier=1.0, ta_width_multiplier=1.0, ta_only_blocks=0)

    def ta_config(self) -> RelevanceConfig:
        """The TA alone, as a Student of the TA's widths (the independent TA of the no-sharing ablation)."""
        return dataclasses.replace(
            self,
            embedding_dim=self.ta_embedding_dim,
            tower_units=tuple(self.ta_width(u) for u in self.tower_units),
            head_units=tuple(self.ta_width(u) for u in self.head_units),
            ta_embedding_multiplier=1.0,
            ta_width_multiplier=1.0,
            ta_only_blocks=0,
        )


def relevance_preprocessor(schema: Schema) -> FeaturePreprocessor:
    """The preprocessing layer the relevance network expects in front of it."""
    return FeaturePreprocessor(schema, name="preprocessor")


def network_inputs(schema: Schema) -> dict[str, keras.KerasTensor]:
    """Keras inputs matching `FeaturePreprocessor`'s outputs, one per model feature.

    Keyed (and named) by `preprocessed_name(feature)`, so that a dict of raw features cannot bind to them.
    """
    inputs = {}
    for feature in schema.model_features:
        name = preprocessed_name(feature)
        if feature.is_multi_valued:
            inputs[name] = keras.Input((padded_length(feature),), dtype="int32", name=name)
        elif feature.is_categorical or feature.boundaries is not None:
            inputs[name] = keras.Input((), dtype="int32", name=name)
        else:
            inputs[name] = keras.Input((feature.shape,), dtype="float32", name=name)
    return inputs


@keras.saving.register_keras_serializable(package="matta_tf")
class PaddingWeights(keras.layers.Layer):
    """1.0 for real values and 0.0 for padding (index 0) of a padded multi-valued feature."""

    def call(self, indices: Any) -> Any:
        return keras.ops.cast(keras.ops.greater(indices, 0), self.compute_dtype)


def _embed(feature: Feature, tensor: Any, config: RelevanceConfig) -> tuple[Any, Any]:
    d_student, d_ta = config.embedding_dim, config.ta_embedding_dim
    name = f"{feature.name}_embedding"
    if feature.is_multi_valued:
        weights = PaddingWeights(name=f"{feature.name}_mask")(tensor)
        layer = NestedEmbedding(embedding_rows(feature), d_student, d_ta, combiner="mean",
                                student_init=config.student_init, name=name)
        return layer(tensor, weights)
    if feature.is_categorical or feature.boundaries is not None:
        layer = NestedEmbedding(embedding_rows(feature), d_student, d_ta, student_init=config.student_init, name=name)
        return layer(tensor)
    # A raw numeric feature: a learned projection of its standardized values.
    return NestedDense(d_student, d_ta, student_init=config.student_init, name=name)(tensor)


def build_relevance_network(schema: Schema, config: RelevanceConfig = RelevanceConfig(),
                            name: str = "relevance") -> keras.Model:
    """The M-nested relevance network: preprocessed features -> `[student_logits, ta_logits]`.

    With `config.student_config()` both streams are the Student (a plain Student in nested layers).
    Its inputs are `network_inputs(schema)`: the outputs of `relevance_preprocessor(schema)`, keyed by
    `preprocessed_name`; a raw batch fails with an error naming the missing preprocessed input.
    """
    inputs = network_inputs(schema)
    embedded = {f.name: _embed(f, inputs[preprocessed_name(f)], config) for f in schema.model_features}
    return keras.Model(inputs, list(_body(schema, embedded, config)), name=name)


def build_shared_embedding_pair(schema: Schema, config: RelevanceConfig = RelevanceConfig(),
                                name: str = "shared_embeddings") -> keras.Model:
    """The paper's Table 4 ablation: Student and TA share only their embedding tables.

    The tables are M-nested as in `build_relevance_network` (the Student reads the first
    `embedding_dim` columns of the TA's `ta_embedding_dim`-wide tables); every layer after them is
    the Student's own (`config.student_config()`, names prefixed `student_`) or the TA's own
    (`config.ta_config()`, prefixed `ta_`, without TA-only blocks, as the independent TA of
    `IndependentStudentTA`). Same inputs and outputs as `build_relevance_network`; its layers after
    the tables are plain widths, so no Mix'n'Match size can be extracted from it.
    """
    inputs = network_inputs(schema)
    embedded = {f.name: _embed(f, inputs[preprocessed_name(f)], config) for f in schema.model_features}
    student_logits, _ = _body(schema, {n: (s, s) for n, (s, _) in embedded.items()}, config.student_config(),
                              prefix="student_")
    _, ta_logits = _body(schema, {n: (t, t) for n, (_, t) in embedded.items()}, config.ta_config(), prefix="ta_")
    return keras.Model(inputs, [student_logits, ta_logits], name=name)


def _body(schema: Schema, embedded: dict[str, tuple[Any, Any]], config: RelevanceConfig,
          prefix: str = "") -> tuple[Any, Any]:
    """Towers, cross layers and head over the embedded `(student, ta)` pairs -> `(student, ta)` logits."""
    towers = []
    for role in ROLES:
        features = [f for f in schema.model_features if f.role == role]
        if not features:
            continue
        x = NestedConcatenate(name=f"{prefix}{role}_features")([embedded[f.name] for f in features])
        for index, units in enumerate(config.tower_units):
            x = NestedDense(units, config.ta_width(units), activation="relu", student_init=config.student_init,
                            name=f"{prefix}{role}_tower_{index}")(x)
        towers.append(x)
    x0 = NestedConcatenate(name=f"{prefix}towers")(towers) if len(towers) > 1 else towers[0]
    x = x0
    for index in range(config.num_cross_layers):
        x = NestedFeatureCross(student_init=config.student_init, name=f"{prefix}cross_{index}")(x0, x)
    for index, units in enumerate(config.head_units):
        x = NestedDense(units, config.ta_width(units), activation="relu", student_init=config.student_init,
                        name=f"{prefix}head_{index}")(x)
        if index == 0:
            # Depth nesting: residual blocks only the TA runs, where its features are in nested order.
            for block in range(config.ta_only_blocks):
                dense = keras.layers.Dense(config.ta_width(units), activation="relu",
                                           name=f"{prefix}ta_block_{block}_dense")
                x = TAOnly(dense, name=f"{prefix}ta_block_{block}")(x)
    return NestedDense(config.num_logits, config.num_logits, student_init=config.student_init,
                       name=f"{prefix}logits")(x)
