"""mnestify on a Sequential MLP, a functional two-tower model and a small Transformer."""

import keras
import keras_rs
import numpy as np
import pytest

from matta_tf.layers import (
    NestedConcatenate,
    NestedDense,
    NestedEmbedding,
    NestedTransformerBlock,
    TAOnly,
    TransformerBlock,
)
from matta_tf.mnestify import mnestify

TOLERANCE = 1e-5


def randomize(model, seed=0):
    """Stands in for training: weights unlike any initializer's."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def mlp_student():
    student = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu", name="hidden_1"),
            keras.layers.Dropout(0.2, name="dropout"),
            keras.layers.Dense(12, activation="relu", name="hidden_2"),
            keras.layers.Dense(1, name="logit"),
            keras.layers.Activation("sigmoid", name="probability"),
        ],
        name="mlp",
    )
    randomize(student)
    return student


def test_sequential_mlp_reproduces_the_student_and_nests_a_plain_ta():
    student = mlp_student()
    nested = mnestify(student, width_multiplier=2.0, ta_only_after={"hidden_2": 1})
    x = np.random.default_rng(1).normal(size=(6, 10)).astype("float32")
    y_student, y_ta = nested(x)
    np.testing.assert_allclose(y_student, student(x), atol=1e-6)

    widths = {layer.name: layer.ta_units for layer in nested.layers if isinstance(layer, NestedDense)}
    assert widths == {"hidden_1": 32, "hidden_2": 24, "logit": 1}  # the output keeps its units
    np.testing.assert_array_equal(
        nested.get_layer("hidden_1").kernel.numpy()[:, :16], student.get_layer("hidden_1").kernel.numpy()
    )

    inputs = keras.Input((10,))
    h = keras.layers.Dense(32, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(24, activation="relu", name="hidden_2")(h)
    h = keras.layers.Add()([h, keras.layers.Dense(24, activation="relu", name="extra")(h)])
    probability = keras.layers.Activation("sigmoid")(keras.layers.Dense(1, name="logit")(h))
    ta = keras.Model(inputs, probability)
    for name in ("hidden_1", "hidden_2", "logit"):
        ta.get_layer(name).set_weights(nested.get_layer(name).get_weights())
    ta.get_layer("extra").set_weights(nested.get_layer("hidden_2_ta_only_0").layer.get_weights())
    np.testing.assert_allclose(y_ta, ta(x), atol=TOLERANCE)


def test_per_layer_multipliers_and_explicit_ta_only_layers():
    student = mlp_student()
    extra = keras.layers.Dense(48, activation="tanh", name="extra")
    nested = mnestify(
        student,
        width_multiplier=3.0,
        layer_width_multipliers={"hidden_2": 4.0, "logit": 2.0},
        ta_only_after={"hidden_2": [extra]},
    )
    assert nested.get_layer("hidden_1").ta_units == 48
    assert nested.get_layer("hidden_2").ta_units == 48
    assert nested.get_layer("logit").ta_units == 2
    assert any(isinstance(layer, TAOnly) and layer.layer is extra for layer in nested.layers)
    x = np.ones((2, 10), "float32")
    np.testing.assert_allclose(nested(x)[0], student(x), atol=1e-6)


def test_fresh_weights_without_copying():
    student = mlp_student()
    nested = mnestify(student, copy_student_weights=False)
    student_kernel = student.get_layer("hidden_1").kernel.numpy()
    fresh_block = nested.get_layer("hidden_1").kernel.numpy()[:, :16]
    assert not np.allclose(fresh_block, student_kernel)
    assert np.abs(fresh_block).max() <= np.sqrt(6 / (10 + 16))  # a standalone glorot draw


def tower(name, vocabulary):
    item_id = keras.Input((), dtype="int32", name=f"{name}_id")
    tags = keras.Input((3,), dtype="int32", name=f"{name}_tags")
    features = keras.layers.Concatenate(name=f"{name}_features")(
        [
            keras.layers.Embedding(vocabulary, 8, name=f"{name}_embedding")(item_id),
            keras_rs.layers.EmbedReduce(10, 4, combiner="mean", name=f"{name}_tag_embedding")(tags),
        ]
    )
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(features)
    return keras.Model([item_id, tags], keras.layers.Dense(8, name="embedding")(hidden), name=name)


def two_tower_student():
    user_tower, item_tower = tower("user", 30), tower("item", 40)
    inputs = {
        "user_id": keras.Input((), dtype="int32", name="user_id"),
        "user_tags": keras.Input((3,), dtype="int32", name="user_tags"),
        "item_id": keras.Input((), dtype="int32", name="item_id"),
        "item_tags": keras.Input((3,), dtype="int32", name="item_tags"),
    }
    score = keras.layers.Dot(axes=-1, name="score")(
        [
            user_tower([inputs["user_id"], inputs["user_tags"]]),
            item_tower([inputs["item_id"], inputs["item_tags"]]),
        ]
    )
    student = keras.Model(inputs, score, name="two_tower")
    randomize(student)
    return student


def two_tower_features(batch=5):
    rng = np.random.default_rng(2)
    return {
        "user_id": rng.integers(0, 30, size=(batch,)),
        "user_tags": rng.integers(0, 10, size=(batch, 3)),
        "item_id": rng.integers(0, 40, size=(batch,)),
        "item_tags": rng.integers(0, 10, size=(batch, 3)),
    }


def test_functional_two_tower_reproduces_the_student():
    student = two_tower_student()
    nested = mnestify(student, width_multiplier=2.0, d_model_multiplier=2.0)
    features = two_tower_features()
    y_student, y_ta = nested(features)
    np.testing.assert_allclose(y_student, student(features), atol=1e-6)
    assert y_ta.shape == (5, 1)
    layers = {layer.name: layer for layer in nested.layers}
    assert isinstance(layers["user_embedding"], NestedEmbedding)
    assert layers["user_embedding"].ta_dim == 16
    assert layers["user_tag_embedding"].combiner == "mean"
    assert isinstance(layers["user_features"], NestedConcatenate)
    # Both towers name their layers "hidden" and "embedding": the second copy gets its tower's prefix.
    assert {"hidden", "item_hidden", "embedding", "item_embedding"} <= set(layers)
    assert layers["embedding"].ta_units == 16  # feeds the Dot, not an output: widened


def transformer_student(vocabulary=13, length=6):
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    positions = keras.Input((length,), dtype="int32", name="positions")
    x = keras.layers.Add(name="embed")(
        [
            keras.layers.Embedding(vocabulary, 8, name="token_embedding")(tokens),
            keras.layers.Embedding(length, 8, name="position_embedding")(positions),
        ]
    )
    x = TransformerBlock(2, 4, 16, name="block_0")(x)
    x = TransformerBlock(2, 4, 16, name="block_1")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    student = keras.Model([tokens, positions], keras.layers.Dense(vocabulary, name="lm_head")(x), name="tiny_lm")
    randomize(student)
    return student


def transformer_inputs(batch=3, length=6):
    tokens = np.random.default_rng(3).integers(0, 13, size=(batch, length))
    return [tokens, np.tile(np.arange(length), (batch, 1))]


def test_small_transformer_reproduces_the_student_and_nests_a_plain_ta():
    student = transformer_student()
    nested = mnestify(
        student,
        width_multiplier=2.0,
        d_model_multiplier=1.5,
        num_heads_multiplier=1.5,
        ta_only_after={"block_0": 1},
    )
    inputs = transformer_inputs()
    y_student, y_ta = nested(inputs)
    np.testing.assert_allclose(y_student, student(inputs), atol=1e-6)

    block = nested.get_layer("block_0")
    assert isinstance(block, NestedTransformerBlock)
    assert (block.ta_ffn_dim, block.ta_num_heads, block.ta_model_dim) == (32, 3, 12)
    tokens, positions = keras.Input((6,), dtype="int32"), keras.Input((6,), dtype="int32")
    x = keras.layers.Add()(
        [
            nested.get_layer("token_embedding").extract(12)(tokens),
            nested.get_layer("position_embedding").extract(12)(positions),
        ]
    )
    x = nested.get_layer("block_0").extract("ta")(x)
    x = nested.get_layer("block_0_ta_only_0").extract()(x)
    x = nested.get_layer("block_1").extract("ta")(x)
    x = nested.get_layer("final_norm").extract(12)(x)
    ta = keras.Model([tokens, positions], nested.get_layer("lm_head").extract(13, 12)(x))
    np.testing.assert_allclose(y_ta, ta(inputs), atol=TOLERANCE)


def test_mnestified_model_survives_keras_save_and_load(tmp_path):
    nested = mnestify(transformer_student(), ta_only_after={"block_1": 1}, d_model_multiplier=2.0)
    path = str(tmp_path / "nested.keras")
    nested.save(path)
    loaded = keras.models.load_model(path)
    inputs = transformer_inputs()
    for before, after in zip(nested(inputs), loaded(inputs), strict=True):
        np.testing.assert_array_equal(before, after)


def test_unsupported_layer_is_named_with_its_class_and_the_supported_list():
    student = keras.Sequential([keras.Input((8, 3)), keras.layers.Conv1D(4, 3, name="conv"), keras.layers.Dense(1)])
    with pytest.raises(
        ValueError, match=r"does not support layer 'conv' of class .*Conv1D\. Supported: Dense, Embedding"
    ):
        mnestify(student)


def test_option_and_model_errors():
    student = mlp_student()
    with pytest.raises(ValueError, match=r"Unknown: \['missing'\]"):
        mnestify(student, ta_only_after={"missing": 1})
    with pytest.raises(
        ValueError,
        match=r"`width_multiplier` must be a number >= 1\. Received: "
        r"width_multiplier=0\.5",
    ):
        mnestify(student, width_multiplier=0.5)
    with pytest.raises(ValueError, match="int count mirrors Dense, TransformerBlock and GAU"):
        mnestify(student, ta_only_after={"dropout": 1})

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="needs a Sequential or functional model"):
        mnestify(Subclassed())


def test_widths_that_disagree_at_a_merge_point_to_the_option():
    inputs = keras.Input((8,))
    residual = keras.layers.Add(name="residual")(
        [inputs, keras.layers.Dense(8, activation="relu", name="block")(inputs)]
    )
    student = keras.Model(inputs, keras.layers.Dense(1, name="logit")(residual))
    with pytest.raises(ValueError, match="layer 'residual'.*`layer_width_multipliers`"):
        mnestify(student)
    nested = mnestify(student, layer_width_multipliers={"block": 1.0}, ta_only_after={"block": 2})
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(nested(x)[0], student(x), atol=1e-6)


def test_flatten_over_nested_token_width_is_refused():
    tokens = keras.Input((4,), dtype="int32")
    x = keras.layers.Flatten(name="flatten")(keras.layers.Embedding(9, 3)(tokens))
    student = keras.Model(tokens, keras.layers.Dense(1)(x))
    with pytest.raises(ValueError, match="'flatten' of class Flatten"):
        mnestify(student, d_model_multiplier=2.0)
    nested = mnestify(student)  # un-nested token width: Flatten runs per stream
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(nested(ids)[0], student(ids), atol=1e-6)


def cross_student():
    """A functional DCN-v2 Student: Dense -> two keras-rs FeatureCross layers -> logit."""
    inputs = keras.Input((6,), name="features")
    x0 = keras.layers.Dense(8, activation="relu", name="embed")(inputs)
    x = keras_rs.layers.FeatureCross(name="cross_0")(x0)
    x = keras_rs.layers.FeatureCross(diag_scale=0.5, name="cross_1")(x0, x)
    student = keras.Model(inputs, keras.layers.Dense(1, name="logit")(x), name="dcn")
    randomize(student, seed=4)
    return student


def test_feature_cross_student_is_reproduced_and_its_ta_cross_is_wider():
    student = cross_student()
    nested = mnestify(student, width_multiplier=2.0)
    features = np.random.default_rng(5).normal(size=(5, 6)).astype("float32")
    y_student, y_ta = nested(features)
    np.testing.assert_allclose(y_student, student(features), atol=1e-6)

    cross_0, cross_1 = nested.get_layer("cross_0"), nested.get_layer("cross_1")
    assert type(cross_0).__name__ == "NestedFeatureCross"
    assert cross_0.dense.kernel.shape == (16, 16) and (cross_0.student_dim, cross_0.ta_dim) == (8, 16)
    np.testing.assert_array_equal(
        cross_0.dense.kernel.numpy()[:8, :8], student.get_layer("cross_0").dense.kernel.numpy()
    )
    # The TA stream, in numpy: the wider embedding, then the 16 x 16 crosses.
    embed, logit = nested.get_layer("embed"), nested.get_layer("logit")
    h0 = np.maximum(features @ embed.kernel.numpy() + embed.bias.numpy(), 0)

    def cross(layer, base, x, diag_scale):
        return base * (x @ layer.dense.kernel.numpy() + layer.dense.bias.numpy() + diag_scale * x) + x

    h = cross(cross_1, h0, cross(cross_0, h0, h0, 0.0), 0.5)
    np.testing.assert_allclose(y_ta, h @ logit.kernel.numpy() + logit.bias.numpy(), atol=TOLERANCE)


def test_feature_cross_student_extracts_to_plain_student_and_ta():
    from matta_tf.extraction import SubmodelSpec, extract_submodel

    student = cross_student()
    nested = mnestify(student, width_multiplier=2.0)
    features = np.random.default_rng(6).normal(size=(5, 6)).astype("float32")
    y_student, y_ta = nested(features)
    for choice, expected in (("student", y_student), ("ta", y_ta)):
        plain = extract_submodel(nested, SubmodelSpec.uniform(nested, choice))
        assert any(isinstance(layer, keras_rs.layers.FeatureCross) for layer in plain.layers)
        np.testing.assert_allclose(plain(features), expected, atol=TOLERANCE)


def test_low_rank_feature_cross_is_refused_by_name():
    inputs = keras.Input((6,))
    x = keras_rs.layers.FeatureCross(projection_dim=2, name="low_rank")(keras.layers.Dense(8)(inputs))
    student = keras.Model(inputs, keras.layers.Dense(1)(x))
    with pytest.raises(ValueError, match=r"'low_rank' of class FeatureCross .*projection_dim=2"):
        mnestify(student)


class SubclassedRanker(keras.Model):
    """A subclassed Student: embeddings, keras.ops in `call`, an MLP."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.user = keras.layers.Embedding(30, 4, name="user_embedding")
        self.item = keras.layers.Embedding(20, 6, name="item_embedding")
        self.hidden = keras.layers.Dense(8, name="hidden")
        self.logit = keras.layers.Dense(1, name="logit")

    def call(self, inputs):
        x = keras.ops.concatenate([self.user(inputs["user"]), self.item(inputs["item"])], axis=-1)
        return self.logit(keras.ops.relu(self.hidden(x)))


class SubclassedCross(keras.Model):
    """A subclassed DCN-v2 Student with a keras-rs FeatureCross."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Dense(8, activation="relu", name="embed")
        self.cross = keras_rs.layers.FeatureCross(name="cross")
        self.logit = keras.layers.Dense(1, name="logit")

    def call(self, x):
        x0 = self.embed(x)
        return self.logit(self.cross(x0, x0))


def ranker_inputs():
    return {"user": keras.Input((), dtype="int32", name="user"), "item": keras.Input((), dtype="int32", name="item")}


def test_subclassed_mlp_with_embeddings_is_reproduced_exactly():
    rng = np.random.default_rng(7)
    data = {"user": rng.integers(0, 30, 9).astype("int32"), "item": rng.integers(0, 20, 9).astype("int32")}
    student = SubclassedRanker(name="ranker")
    student(data)
    randomize(student, seed=8)
    nested = mnestify(student, width_multiplier=2.0, d_model_multiplier=2.0, inputs=ranker_inputs())
    y_student, y_ta = nested(data)
    np.testing.assert_array_equal(y_student, student(data))
    assert nested.get_layer("user_embedding").ta_dim == 8 and nested.get_layer("hidden").ta_units == 16
    assert y_ta.shape == (9, 1)
    with pytest.raises(ValueError, match="pass `inputs`"):
        mnestify(student)


def test_subclassed_feature_cross_student_is_reproduced_exactly():
    features = np.random.default_rng(9).normal(size=(5, 6)).astype("float32")
    student = SubclassedCross(name="cross_model")
    student(features)
    randomize(student, seed=10)
    nested = mnestify(student, width_multiplier=2.0, inputs=keras.Input((6,)))
    y_student, y_ta = nested(features)
    np.testing.assert_array_equal(y_student, student(features))
    assert nested.get_layer("cross").dense.kernel.shape == (16, 16)


def test_a_call_that_cannot_be_traced_is_named():
    class UsesNumpy(keras.Model):
        def __init__(self):
            super().__init__(name="uses_numpy")
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(np.asarray(x) * 2)

    with pytest.raises(ValueError, match="Could not trace the `call` of 'uses_numpy'"):
        mnestify(UsesNumpy(), inputs=keras.Input((3,)))


def test_a_subclassed_sub_model_inside_a_functional_student_is_named():
    class Tower(keras.Model):
        def __init__(self):
            super().__init__(name="tower")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    inputs = keras.Input((4,))
    student = keras.Model(inputs, keras.layers.Dense(1)(Tower()(inputs)))
    with pytest.raises(ValueError, match="cannot follow inside the subclassed sub-model 'tower'"):
        mnestify(student)
