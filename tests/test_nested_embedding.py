"""NestedEmbedding: single and multi-valued ids against plain Keras / keras-rs tables with sliced columns."""

import keras
import keras_rs
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import NestedEmbedding

TOLERANCE = 1e-6
VOCABULARY = 12


def random_table(layer, seed=0):
    table = np.random.default_rng(seed).normal(size=layer.embeddings.shape).astype("float32")
    layer.embeddings.assign(table)
    return table


def plain_table(table, combiner):
    if combiner is None:
        plain = keras.layers.Embedding(table.shape[0], table.shape[1])
    else:
        plain = keras_rs.layers.EmbedReduce(table.shape[0], table.shape[1], combiner=combiner)
    plain.build()
    plain.embeddings.assign(table)
    return plain


@pytest.mark.parametrize("ids_shape", [(5,), (3, 4)])
def test_single_ids_equal_plain_embeddings(ids_shape):
    ids = np.random.default_rng(1).integers(0, VOCABULARY, size=ids_shape)
    layer = NestedEmbedding(VOCABULARY, 3, 8)
    layer(ids)
    table = random_table(layer)
    e_student, e_ta = layer(ids)
    np.testing.assert_allclose(e_student, plain_table(table[:, :3], None)(ids), atol=TOLERANCE)
    np.testing.assert_allclose(e_ta, plain_table(table, None)(ids), atol=TOLERANCE)


def multi_valued_ids(kind):
    if kind == "dense":
        return np.array([[1, 4, 4], [2, 0, 7], [5, 6, 11]])
    if kind == "ragged":
        return tf.ragged.constant([[1, 4], [2], [5, 6, 11]])
    return tf.sparse.from_dense(tf.constant([[1, 4, 0], [2, 0, 0], [5, 6, 11]]))


@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
@pytest.mark.parametrize("kind", ["dense", "ragged", "sparse"])
def test_multi_valued_ids_equal_embed_reduce(combiner, kind):
    ids = multi_valued_ids(kind)
    layer = NestedEmbedding(VOCABULARY, 3, 8, combiner=combiner)
    layer(ids)
    table = random_table(layer)
    e_student, e_ta = layer(ids)
    np.testing.assert_allclose(e_student, plain_table(table[:, :3], combiner)(ids), atol=TOLERANCE)
    np.testing.assert_allclose(e_ta, plain_table(table, combiner)(ids), atol=TOLERANCE)


def test_weighted_multi_valued_ids_equal_embed_reduce():
    ids = np.array([[1, 4, 3], [2, 0, 7]])
    weights = np.array([[0.5, 2.0, 1.0], [1.0, 0.0, 3.0]], "float32")
    layer = NestedEmbedding(VOCABULARY, 2, 5, combiner="mean")
    layer(ids, weights)
    table = random_table(layer)
    e_student, e_ta = layer(ids, weights)
    np.testing.assert_allclose(e_student, plain_table(table[:, :2], "mean")(ids, weights), atol=TOLERANCE)
    np.testing.assert_allclose(e_ta, plain_table(table, "mean")(ids, weights), atol=TOLERANCE)


def test_equal_widths_give_one_tensor():
    e_student, e_ta = NestedEmbedding(VOCABULARY, 4, 4)(np.array([1, 2]))
    assert e_student is e_ta


def test_default_init_student_columns_equal_standalone_student_init():
    layer = NestedEmbedding(VOCABULARY, 3, 10, embeddings_initializer=keras.initializers.GlorotNormal(seed=5))
    layer.build()
    expected = keras.initializers.GlorotNormal(seed=5)(shape=(VOCABULARY, 3))
    np.testing.assert_array_equal(layer.embeddings.numpy()[:, :3], expected)
    ta_slice = NestedEmbedding(
        VOCABULARY,
        3,
        10,
        embeddings_initializer=keras.initializers.GlorotNormal(seed=5),
        student_init="ta_slice",
    )
    ta_slice.build()
    np.testing.assert_array_equal(
        ta_slice.embeddings.numpy(), keras.initializers.GlorotNormal(seed=5)(shape=(VOCABULARY, 10))
    )


@pytest.mark.parametrize("combiner", [None, "sum"])
@pytest.mark.parametrize("dim", [3, 6, 8])
def test_extract_returns_plain_layer_with_copied_columns(combiner, dim):
    layer = NestedEmbedding(VOCABULARY, 3, 8, combiner=combiner, name="genres")
    layer.build()
    table = random_table(layer)
    plain = layer.extract(dim)
    expected_class = keras.layers.Embedding if combiner is None else keras_rs.layers.EmbedReduce
    assert type(plain) is expected_class and plain.name == "genres"
    layer.embeddings.assign(np.zeros_like(table))
    np.testing.assert_array_equal(plain.embeddings.numpy(), table[:, :dim])


def test_assign_subnet_writes_leading_columns():
    layer = NestedEmbedding(VOCABULARY, 3, 8)
    layer.build()
    before = layer.embeddings.numpy()
    layer.assign_subnet(plain_table(np.ones((VOCABULARY, 3), "float32"), None))
    np.testing.assert_array_equal(layer.embeddings.numpy()[:, :3], 1.0)
    np.testing.assert_array_equal(layer.embeddings.numpy()[:, 3:], before[:, 3:])


def test_errors_name_the_argument_and_value():
    with pytest.raises(
        ValueError,
        match=r"`student_dim` must be <= `ta_dim`\. Received: "
        r"student_dim=8, ta_dim=4",
    ):
        NestedEmbedding(VOCABULARY, 8, 4)
    with pytest.raises(ValueError, match="`combiner` must be one of"):
        NestedEmbedding(VOCABULARY, 2, 4, combiner="max")
    with pytest.raises(ValueError, match="`weights` need a `combiner`"):
        NestedEmbedding(VOCABULARY, 2, 4)(np.array([[1, 2]]), np.ones((1, 2), "float32"))


def test_keras_save_and_load_keep_outputs(tmp_path):
    ids = keras.Input((3,), dtype="int32")
    e_student, e_ta = NestedEmbedding(VOCABULARY, 2, 6, combiner="sqrtn", name="tags")(ids)
    model = keras.Model(ids, [e_student, e_ta])
    path = str(tmp_path / "embedding.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    batch = np.array([[1, 2, 3], [4, 4, 0]])
    for before, after in zip(model(batch), loaded(batch), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("combiner", [None, "mean"])
def test_runs_under_xla(combiner):
    ids = np.array([[1, 4, 3], [2, 0, 7]])
    layer = NestedEmbedding(VOCABULARY, 2, 5, combiner=combiner)
    eager = layer(ids)
    compiled = tf.function(lambda x: layer(x), jit_compile=True)(ids)
    for got, want in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(got, want, atol=TOLERANCE)
