"""Invalid labels never reach the MatTA loss: a clear error by default, or a counted skip (and under XLA)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import Label
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.training import MatTAModel, losses


def _network(width: int = 1, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = NestedDense(4, 8, activation="relu")(inputs)
    return keras.Model(inputs, list(NestedDense(width, width)(hidden)))


def _data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x.sum(axis=1) > 0).astype("int64")


def _fit(model: MatTAModel, x, y, jit_compile: bool = False, **kwargs):
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
    return model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, **kwargs)


def test_binary_labels_outside_0_1_fail_with_the_label_and_the_value():
    x, y = _data()
    y[5], y[9] = 7, -1  # both in the first batch
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape("MatTAModel: label `click` must be a class index in [0, 2); found] [7 -1]")):
        _fit(MatTAModel(_network(), label=Label("click")), x, y)


@pytest.mark.parametrize(("label", "values", "rule"), [
    (Label("stars", task="multiclass", num_classes=3), [0, 1, 3, 2], "must be a class index in [0, 3); found] [3"),
    (Label("p", source="teacher"), [0.2, 1.5, np.nan, 0.4],
     "holds probabilities: must be finite and in [0, 1]; found] [1.5 nan"),
])
def test_invalid_classes_probabilities_and_non_finite_values_fail(label, values, rule):
    x, _ = _data(48)
    width = 3 if label.num_classes == 3 else 1
    y = np.resize(np.asarray(values, "float32" if label.source == "teacher" else "int64"), 48)
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(f"label `{label.name}` {rule}")):
        _fit(MatTAModel(_network(width), label=label), x, y)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_skipped_labels_get_weight_zero_and_are_counted(jit_compile):
    """`invalid_labels="skip"` (and XLA, which drops assertions): the loss is that of the valid rows only."""
    x, y = _data()
    bad = np.arange(0, 64, 10)  # 10% of the labels = 7
    y_bad = y.copy()
    y_bad[bad] = 7
    mode = "skip" if not jit_compile else "raise"  # under XLA even "raise" can only skip
    model = MatTAModel(_network(), mode="student_only", loss_weights=(1.0, 1.0, 0.0), invalid_labels=mode)
    model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=jit_compile)  # no update: loss at init
    x_tensor = tf.constant(x)
    results = model.evaluate(x, y_bad, batch_size=64, verbose=0, return_dict=True)
    logits = keras.ops.convert_to_numpy(model(x_tensor)["student"]).reshape(-1)
    keep = np.ones(64, bool)
    keep[bad] = False
    per_example = np.logaddexp(0.0, -logits) * y + np.logaddexp(0.0, logits) * (1 - y)  # BCE from logits
    expected = (per_example * keep).sum() / 64  # "sum_over_batch_size" with weight 0 for invalid rows
    assert results["student_loss"] == pytest.approx(expected, rel=1e-5)
    assert results["loss"] >= 0  # bounded below: a label of 7 no longer rewards huge logits
    assert results["invalid_labels"] == len(bad)
    history = _fit(model, x, y_bad, jit_compile=jit_compile)
    assert history.history["invalid_labels"] == [len(bad)]


def test_nan_teacher_probabilities_skipped_keep_the_weights_finite():
    x, _ = _data()
    y = np.random.default_rng(1).uniform(size=64).astype("float32")
    y[::7] = np.nan
    y[3] = 1e6
    model = MatTAModel(_network(), label=Label("p", source="teacher"), invalid_labels="skip")
    _fit(model, x, y)
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def test_valid_label_rows_against_the_rule():
    rows = losses.valid_label_rows(np.array([0, 1, 2, -1, 1.5, np.nan]), "binary")
    np.testing.assert_array_equal(rows, [True, True, False, False, False, False])
    rows = losses.valid_label_rows(np.array([0.0, 1.0, -np.inf, 3.0]), "binary", "logits")
    np.testing.assert_array_equal(rows, [True, True, False, True])
    rows = losses.valid_label_rows(np.array([[0.1, 0.9], [0.5, np.nan], [1.2, 0.0]], "float32"), "multiclass",
                                   "probabilities", 2)
    np.testing.assert_array_equal(rows, [True, False, False])
    with pytest.raises(ValueError, match="invalid_labels"):
        MatTAModel(_network(), invalid_labels="ignore")
