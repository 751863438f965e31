"""Multi-layer nested stacks with depth nesting against plain Student and TA Keras models."""

import keras
import keras_rs
import numpy as np
import tensorflow as tf

from matta_tf.layers import (
    NestedConcatenate,
    NestedDense,
    NestedEmbedding,
    NestedNormalization,
    NestedTransformerBlock,
    TAOnly,
    TransformerBlock,
)

TOLERANCE = 1e-5


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def relevance_features(batch=4, seed=1):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 20, size=(batch,)),
        rng.integers(0, 10, size=(batch, 3)),
        rng.normal(size=(batch, 5)).astype("float32"),
    ]


def nested_relevance_mlp():
    user, tags, dense = (
        keras.Input((), dtype="int32"),
        keras.Input((3,), dtype="int32"),
        keras.Input((5,)),
    )
    x = NestedConcatenate(name="features")(
        [
            NestedEmbedding(20, 4, 8, name="user")(user),
            NestedEmbedding(10, 3, 6, combiner="mean", name="tags")(tags),
            dense,
        ]
    )
    x = NestedDense(16, 32, activation="relu", name="hidden_1")(x)
    x = TAOnly(keras.layers.Dense(32, activation="relu"), name="ta_only")(x)
    x = NestedDense(8, 16, activation="relu", name="hidden_2")(x)
    outputs = NestedDense(1, 1, name="logit")(x)
    return keras.Model([user, tags, dense], list(outputs))


def plain_relevance_mlp(user_dim, tag_dim, hidden_1, hidden_2, ta_only):
    user, tags, dense = (
        keras.Input((), dtype="int32"),
        keras.Input((3,), dtype="int32"),
        keras.Input((5,)),
    )
    x = keras.layers.Concatenate()(
        [
            keras.layers.Embedding(20, user_dim, name="user")(user),
            keras_rs.layers.EmbedReduce(10, tag_dim, combiner="mean", name="tags")(tags),
            dense,
        ]
    )
    x = keras.layers.Dense(hidden_1, activation="relu", name="hidden_1")(x)
    if ta_only:
        x = keras.layers.Add()([x, keras.layers.Dense(hidden_1, activation="relu", name="ta_only")(x)])
    x = keras.layers.Dense(hidden_2, activation="relu", name="hidden_2")(x)
    return keras.Model([user, tags, dense], keras.layers.Dense(1, name="logit")(x))


def test_relevance_mlp_streams_equal_plain_student_and_ta():
    nested = nested_relevance_mlp()
    randomize(nested)
    features = relevance_features()
    y_student, y_ta = nested(features)
    weights = {layer.name: layer.get_weights() for layer in nested.layers}

    student = plain_relevance_mlp(4, 3, 16, 8, ta_only=False)
    student.get_layer("user").set_weights([weights["user"][0][:, :4]])
    student.get_layer("tags").set_weights([weights["tags"][0][:, :3]])
    for name, rows, columns in (("hidden_1", 12, 16), ("hidden_2", 16, 8), ("logit", 8, 1)):
        kernel, bias = weights[name]
        student.get_layer(name).set_weights([kernel[:rows, :columns], bias[:columns]])
    np.testing.assert_allclose(y_student, student(features), atol=TOLERANCE)

    ta = plain_relevance_mlp(8, 6, 32, 16, ta_only=True)
    ta.get_layer("user").set_weights(weights["user"])
    ta.get_layer("tags").set_weights(weights["tags"])
    # NestedConcatenate orders the TA's features [user[:4], tags[:3], dense, user[4:], tags[3:]];
    # a plain Concatenate orders them [user, tags, dense], so the plain TA reads permuted rows.
    rows = [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 16, 17, 18, 7, 8, 9, 10, 11]
    kernel, bias = weights["hidden_1"]
    ta.get_layer("hidden_1").set_weights([kernel[rows], bias])
    ta.get_layer("ta_only").set_weights(weights["ta_only"])
    ta.get_layer("hidden_2").set_weights(weights["hidden_2"])
    ta.get_layer("logit").set_weights(weights["logit"])
    np.testing.assert_allclose(y_ta, ta(features), atol=TOLERANCE)


def nested_transformer(vocabulary=11, length=5):
    tokens = keras.Input((length,), dtype="int32")
    x = NestedEmbedding(vocabulary, 8, 12, name="embedding")(tokens)
    x = NestedTransformerBlock(2, 4, 16, 32, ta_num_heads=3, name="block_0")(x)
    x = TAOnly(TransformerBlock(3, 4, 32), residual=False, name="ta_block")(x)
    x = NestedTransformerBlock(2, 4, 16, 32, ta_num_heads=3, name="block_1")(x)
    x = NestedNormalization(name="final_norm")(x)
    outputs = NestedDense(vocabulary, vocabulary, name="head")(x)
    return keras.Model(tokens, list(outputs))


def test_transformer_stack_with_depth_nesting_equals_extracted_plain_models():
    nested = nested_transformer()
    randomize(nested)
    tokens = np.random.default_rng(2).integers(0, 11, size=(3, 5))
    y_student, y_ta = nested(tokens)

    def plain_model(stream, model_dim):
        layers = [
            keras.Input((5,), dtype="int32"),
            nested.get_layer("embedding").extract(model_dim),
            nested.get_layer("block_0").extract(stream),
        ]
        if stream == "ta":
            layers.append(nested.get_layer("ta_block").extract())
        layers += [
            nested.get_layer("block_1").extract(stream),
            nested.get_layer("final_norm").extract(model_dim),
            nested.get_layer("head").extract(11, model_dim),
        ]
        return keras.Sequential(layers)

    np.testing.assert_allclose(y_student, plain_model("student", 8)(tokens), atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, plain_model("ta", 12)(tokens), atol=TOLERANCE)


def test_stacks_survive_keras_save_and_load(tmp_path):
    for name, nested, inputs in (
        ("mlp", nested_relevance_mlp(), relevance_features()),
        ("transformer", nested_transformer(), np.random.default_rng(3).integers(0, 11, (2, 5))),
    ):
        randomize(nested)
        path = str(tmp_path / f"{name}.keras")
        nested.save(path)
        loaded = keras.models.load_model(path)
        for before, after in zip(nested(inputs), loaded(inputs), strict=True):
            np.testing.assert_array_equal(before, after)


def test_relevance_mlp_gradients_under_xla_equal_eager():
    nested = nested_relevance_mlp()
    features = relevance_features(batch=8)
    labels = np.random.default_rng(4).integers(0, 2, size=(8, 1)).astype("float32")
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def loss_and_grads(*inputs):
        with tf.GradientTape() as tape:
            y_student, y_ta = nested(list(inputs))
            loss = loss_fn(labels, y_student) + loss_fn(labels, y_ta)
        return loss, tape.gradient(loss, nested.trainable_variables)

    eager = loss_and_grads(*features)
    compiled = tf.function(loss_and_grads, jit_compile=True)(*features)
    np.testing.assert_allclose(compiled[0], eager[0], atol=TOLERANCE)
    for got, want in zip(compiled[1], eager[1], strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(got), tf.convert_to_tensor(want), atol=TOLERANCE)
