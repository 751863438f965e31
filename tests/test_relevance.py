"""The reference relevance model: preprocessing, nested towers, Student-stream exactness, saving."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import Feature, Label, Schema
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.models.relevance import ConfigError, RelevanceConfig, build_relevance_network, build_shared_embedding_pair

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=tuple(range(1, 30))),
        Feature("device", "context", "string", vocabulary=("ios", "web")),
        Feature("history", "context", "multi_categorical", dtype="int64", vocabulary=tuple(range(50)), max_length=4),
        Feature("item_id", "item", "int_id", vocabulary=tuple(range(50))),
        Feature("tags", "item", "multi_categorical", dtype="string", vocabulary=("a", "b", "c")),
        Feature("price", "item", "numeric", boundaries=(1.0, 10.0)),
        Feature("score", "item", "numeric", shape=2, mean=1.0, std=2.0),
        Feature("timestamp", "metadata", "int_id"),
    ),
    labels=(Label("label"),),
)
CONFIG = RelevanceConfig(embedding_dim=4, tower_units=(8, 6), head_units=(8,), num_cross_layers=2)


def _raw_batch(n: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "user_id": tf.constant(rng.integers(0, 40, n), tf.int64),
        "device": tf.constant(rng.choice(["ios", "web", "tv"], n)),
        "history": tf.ragged.constant([rng.integers(0, 60, rng.integers(0, 7)).tolist() for _ in range(n)],
                                      dtype=tf.int64, ragged_rank=1),
        "item_id": tf.constant(rng.integers(0, 60, n), tf.int64),
        "tags": tf.ragged.constant([rng.choice(["a", "b", "c", "z"], rng.integers(0, 3)).tolist() for _ in range(n)],
                                   dtype=tf.string, ragged_rank=1),
        "price": tf.constant(rng.uniform(0, 20, n), tf.float32),
        "score": tf.constant(rng.normal(size=(n, 2)), tf.float32),
        "timestamp": tf.constant(np.arange(n), tf.int64),
    }


def test_preprocessor_indices_padding_and_standardization():
    raw = {k: v for k, v in _raw_batch().items()}
    raw["history"] = tf.ragged.constant([[], [1, 2, 3, 4, 5, 99]], dtype=tf.int64)
    raw = {k: (v[:2] if k != "history" else v) for k, v in raw.items()}
    out = FeaturePreprocessor(SCHEMA)(raw)
    # Keyed by the preprocessed names (never the raw ones); metadata ("timestamp") is dropped.
    assert set(out) == {"user_id_index", "device_index", "history_index", "item_id_index", "tags_index",
                        "price_index", "score_scaled"}
    # Last 4 values kept: index = vocabulary position + 1 (OOV bucket) + 1 (padding); unknown 99 -> OOV (1).
    np.testing.assert_array_equal(out["history_index"].numpy(), [[0, 0, 0, 0], [5, 6, 7, 1]])
    np.testing.assert_allclose(out["score_scaled"].numpy(), (raw["score"].numpy() - 1.0) / 2.0, rtol=1e-6)
    dense = FeaturePreprocessor(SCHEMA)({**raw, "history": tf.constant([[-1, -1], [5, 99]], tf.int64)})
    np.testing.assert_array_equal(dense["history_index"].numpy(), [[0, 0, 0, 0], [7, 1, 0, 0]])


def _student_twin(nested: keras.Model) -> keras.Model:
    """A plain Student (both streams the Student) holding the leading blocks of the nested weights."""
    twin = build_relevance_network(SCHEMA, CONFIG.student_config())
    nested_weights = {w.path: w.numpy() for w in nested.weights}
    for weight in twin.weights:
        source = nested_weights[weight.path]
        weight.assign(source[tuple(slice(0, s) for s in weight.shape)])
    return twin


def test_student_stream_equals_plain_student_with_sliced_weights():
    nested = build_relevance_network(SCHEMA, CONFIG)
    features = FeaturePreprocessor(SCHEMA)(_raw_batch())
    student, ta = nested(features)
    twin_student, twin_ta = _student_twin(nested)(features)
    np.testing.assert_allclose(student.numpy(), twin_student.numpy(), atol=1e-5)
    np.testing.assert_array_equal(twin_student.numpy(), twin_ta.numpy())
    assert not np.allclose(student.numpy(), ta.numpy())
    student_params = build_relevance_network(SCHEMA, CONFIG.student_config()).count_params()
    ta_params = build_relevance_network(SCHEMA, CONFIG.ta_config()).count_params()
    assert student_params < nested.count_params() == ta_params


def test_jit_compile_and_keras_round_trip(tmp_path):
    nested = build_relevance_network(SCHEMA, CONFIG)
    features = FeaturePreprocessor(SCHEMA)(_raw_batch(seed=1))
    eager = [t.numpy() for t in nested(features)]
    compiled = [t.numpy() for t in tf.function(nested, jit_compile=True)(features)]
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    nested.save(tmp_path / "relevance.keras")
    restored = keras.saving.load_model(tmp_path / "relevance.keras")
    for a, b in zip(eager, restored(features), strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_student_blocks_are_initialized_like_a_standalone_student():
    # The Student block of the first tower layer has glorot bounds of the Student's own fan-in/fan-out.
    wide = RelevanceConfig(embedding_dim=16, tower_units=(64,), head_units=(), ta_width_multiplier=8,
                           ta_embedding_multiplier=8)
    for student_init, expect_standalone in (("standalone", True), ("ta_slice", False)):
        nested = build_relevance_network(SCHEMA, RelevanceConfig(**{**wide.__dict__, "student_init": student_init}))
        kernel = nested.get_layer("user_tower_0").kernel.numpy()
        student_block = kernel[:16, :64]
        standalone_limit = np.sqrt(6 / (16 + 64))
        ta_limit = np.sqrt(6 / (128 + 512))
        assert np.abs(kernel).max() <= standalone_limit + 1e-6
        assert (np.abs(student_block).max() > ta_limit * 1.5) == expect_standalone


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="ta_width_multiplier"):
        RelevanceConfig(ta_width_multiplier=0.5)
    with pytest.raises(ConfigError, match="unknown field 'hidden'"):
        RelevanceConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="student_init"):
        RelevanceConfig(student_init="random")


def test_shared_embedding_pair_shares_the_tables_and_nothing_else(tmp_path):
    """Table 4's ablation: the Student's loss reaches its own layers and its slice of the nested tables,
    the TA's loss its own layers and the whole tables; no layer after the tables is shared."""
    network = build_shared_embedding_pair(SCHEMA, dataclasses.replace(CONFIG, ta_only_blocks=1))
    features = FeaturePreprocessor(SCHEMA)(_raw_batch(seed=2))
    tables = [v for v in network.trainable_variables if "embedding" in v.path and len(v.shape) == 2
              and "price" not in v.path and "score" not in v.path]
    assert tables and all(v.shape[1] == 16 for v in tables)  # the TA's width, 4 x 4
    gradients = {}
    for stream in (0, 1):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(network(features)[stream])
        gradients[stream] = dict(zip([v.path for v in network.trainable_variables],
                                     tape.gradient(loss, network.trainable_variables), strict=True))
    embedding_paths = {v.path for v in network.trainable_variables if "_embedding/" in v.path}
    for path in {v.path for v in network.trainable_variables} - embedding_paths:
        student, ta = gradients[0][path], gradients[1][path]
        assert (student is None) != (ta is None), path  # one stream's own layer
        assert ("student_" in path) == (student is not None) and ("ta_" in path) == (ta is not None), path
    for table in tables:
        student = tf.convert_to_tensor(gradients[0][table.path]).numpy()
        ta = tf.convert_to_tensor(gradients[1][table.path]).numpy()
        assert np.abs(student[:, :4]).sum() > 0 and np.abs(student[:, 4:]).sum() == 0, table.path
        assert np.abs(ta[:, 4:]).sum() > 0, table.path
    nested = build_relevance_network(SCHEMA, CONFIG)
    assert len(network.trainable_variables) > len(nested.trainable_variables)
    network.save(tmp_path / "pair.keras")
    restored = keras.saving.load_model(tmp_path / "pair.keras")
    for a, b in zip(network(features), restored(features), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
