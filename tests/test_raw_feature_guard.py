"""A relevance network fed raw (un-preprocessed) features fails naming the feature; it never binds them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import matta_tf.data
from matta_tf.data import Feature, FeaturePreprocessor, Label, Schema, preprocessed_name
from matta_tf.models.relevance import RelevanceConfig, build_relevance_network, relevance_preprocessor
from matta_tf.training import MatTAModel

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=tuple(range(1000, 1030))),
        Feature("item_id", "item", "int_id", vocabulary=tuple(range(2000, 2040))),
        Feature("price", "item", "numeric", mean=5.0, std=2.0),
    ),
    labels=(Label("label"),),
)
CONFIG = RelevanceConfig(embedding_dim=4, tower_units=(6,), head_units=(6,), num_cross_layers=1)
RAW_MISSING = r'Missing data for input "(user_id_index|item_id_index|price_scaled)"'


def _raw(user_ids, item_ids, dtype=tf.int64) -> dict:
    n = len(user_ids)
    return {"user_id": tf.constant(user_ids, dtype), "item_id": tf.constant(item_ids, dtype),
            "price": tf.constant(np.linspace(1.0, 9.0, n), tf.float32)}


def test_feature_preprocessor_is_exported_and_keys_its_outputs_by_preprocessed_names():
    assert matta_tf.data.FeaturePreprocessor is matta_tf.data.preprocessing.FeaturePreprocessor
    features = FeaturePreprocessor(SCHEMA)(_raw([1000, 1029, 7], [2001, 2000, 2039]))
    assert set(features) == {"user_id_index", "item_id_index", "price_scaled"}
    assert [preprocessed_name(f) for f in SCHEMA.model_features] == ["user_id_index", "item_id_index", "price_scaled"]
    # Vocabulary position + 1 OOV bucket at 0 (7 is unknown); (x - mean) / std.
    assert features["user_id_index"].numpy().tolist() == [1, 30, 0]
    np.testing.assert_allclose(features["price_scaled"].numpy().ravel(), (np.linspace(1, 9, 3) - 5.0) / 2.0)


@pytest.mark.parametrize(
    "user_ids, item_ids, dtype",
    [
        ([2113, 4000, 1015], [2113, 9999, 2005], tf.int64),  # raw ids outside the embedding tables
        ([3, 17, 25], [1, 30, 39], tf.int64),  # raw ids that fall inside the tables (31 and 41 rows)
        ([3, 17, 25], [1, 30, 39], tf.int32),  # ... even with the preprocessed dtype
    ],
    ids=["outside-the-table", "inside-the-table", "inside-the-table-int32"],
)
def test_network_fed_raw_ids_fails_naming_the_feature(user_ids, item_ids, dtype):
    network = build_relevance_network(SCHEMA, CONFIG)
    raw = _raw(user_ids, item_ids, dtype)
    with pytest.raises(ValueError, match=RAW_MISSING) as error:
        network(raw)
    # It names the raw keys it was given and the preprocessed ones it expects.
    assert "keys ['user_id', 'item_id', 'price']" in str(error.value)
    assert "['item_id_index', 'price_scaled', 'user_id_index']" in str(error.value)
    # The same batch through the preprocessor is what the network reads.
    student, ta = network(relevance_preprocessor(SCHEMA)(raw))
    assert student.shape == ta.shape == (3, 1)


def test_matta_fit_on_raw_batches_fails_before_training():
    network = build_relevance_network(SCHEMA, CONFIG)
    model = MatTAModel(network)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [w.numpy() for w in network.weights]
    raw = _raw([3, 17, 25, 4], [1, 30, 39, 2])  # inside the tables
    labels = tf.constant([0, 1, 1, 0], tf.int64)
    with pytest.raises(ValueError, match=RAW_MISSING):
        model.fit(tf.data.Dataset.from_tensors((raw, labels)), epochs=1, verbose=0)
    for old, new in zip(before, network.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())  # nothing was trained on the wrong rows
    preprocessor = relevance_preprocessor(SCHEMA)
    model = MatTAModel(network)  # a fresh trainer: Keras keeps the failed trace of the first one
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensors((preprocessor(_raw([1000, 1001, 1002, 1003], [2000, 2001, 2002, 2003])),
                                            labels)), epochs=1, verbose=0)
    assert any(not np.array_equal(old, new.numpy()) for old, new in zip(before, network.weights, strict=True))


def test_preprocessed_name_colliding_with_a_raw_feature_is_refused():
    schema = Schema(features=(Feature("user", "user", "int_id", vocabulary=(1, 2)),
                              Feature("user_index", "user", "int_id", vocabulary=(1, 2))))
    with pytest.raises(ValueError, match=r"feature 'user' is preprocessed to 'user_index'.*raw feature"):
        FeaturePreprocessor(schema)
