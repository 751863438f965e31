"""No gradient into the TA from L_D: exact zeros on TA-only parameters, Student-path-only on shared ones."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from matta_tf.layers.nested_dense import NestedDense
from matta_tf.training import IndependentStudentTA, MatTAModel, losses

FEATURES = 6
# (student_units, ta_units) per nested layer; the last is the logit layer.
WIDTHS = ((3, 8), (2, 5))


def nested_network(width: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    x = inputs
    for index, (student_units, ta_units) in enumerate(WIDTHS):
        x = NestedDense(student_units, ta_units, activation="tanh", name=f"hidden_{index}")(x)
    return keras.Model(inputs, list(NestedDense(width, width, name="logits")(x)))


def student_masks(network: keras.Model) -> dict[str, np.ndarray]:
    """1 on the entries the Student reads (its leading blocks), 0 on TA-only entries, per variable path."""
    student_in = FEATURES
    masks = {}
    for layer in network.layers[1:]:
        mask = np.zeros(layer.kernel.shape)
        mask[:student_in, : layer.student_units] = 1
        masks[layer.kernel.path] = mask
        bias_mask = np.zeros(layer.bias.shape)
        bias_mask[: layer.student_units] = 1
        masks[layer.bias.path] = bias_mask
        student_in = layer.student_units
    return masks


def data(width: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, FEATURES)).astype("float32")
    y = rng.integers(0, 2 if width == 1 else width, size=32)
    return x, y


def gradients(network, loss_fn, x):
    with tf.GradientTape() as tape:
        student_logits, ta_logits = network(x)
        loss = ops.mean(loss_fn(student_logits, ta_logits))
    return {
        v.path: g
        for v, g in zip(network.trainable_variables, tape.gradient(loss, network.trainable_variables), strict=True)
    }


@pytest.mark.parametrize("task,width", [("binary", 1), ("multiclass", 4)])
def test_distillation_gradient_is_zero_on_every_ta_only_parameter(task, width):
    network = nested_network(width)
    x, _ = data(width)
    grads = gradients(network, lambda s, t: losses.distillation_loss(s, t, task), x)
    masks = student_masks(network)
    assert set(grads) == set(masks)
    for path, grad in grads.items():
        grad = ops.convert_to_numpy(grad)
        assert np.all(grad[masks[path] == 0] == 0.0), path  # exactly zero, not just small
        assert np.any(grad[masks[path] == 1] != 0.0), path  # the Student part does learn from L_D


@pytest.mark.parametrize("task,width", [("binary", 1), ("multiclass", 4)])
def test_distillation_gradient_on_shared_parameters_is_the_student_path_only(task, width):
    # Reference: the TA's probabilities computed beforehand, outside the tape, as a constant target.
    # Any gradient through the TA stream (which also reads the shared Student blocks) would differ.
    network = nested_network(width)
    x, _ = data(width)
    ta_probabilities = ops.convert_to_numpy(losses.probabilities(network(x)[1], task))
    grads = gradients(network, lambda s, t: losses.distillation_loss(s, t, task), x)
    reference = gradients(network, lambda s, t: losses.cross_entropy(ta_probabilities, s, task), x)
    for path in grads:
        np.testing.assert_allclose(
            ops.convert_to_numpy(grads[path]), ops.convert_to_numpy(reference[path]), rtol=1e-6, atol=1e-8, err_msg=path
        )


def test_without_sharing_the_ta_network_gets_no_distillation_gradient():
    keras.utils.set_random_seed(0)
    student = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)], name="student"
    )
    ta = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)], name="ta"
    )
    network = IndependentStudentTA(student, ta)
    x, _ = data(1)
    with tf.GradientTape() as tape:
        student_logits, ta_logits = network(x)
        loss = ops.mean(losses.distillation_loss(student_logits, ta_logits, "binary"))
    ta_grads = tape.gradient(loss, ta.trainable_variables)
    assert all(g is None or np.all(ops.convert_to_numpy(g) == 0.0) for g in ta_grads)
    with tf.GradientTape() as tape:
        loss = ops.mean(losses.distillation_loss(*network(x), "binary"))
    assert all(np.any(ops.convert_to_numpy(g) != 0.0) for g in tape.gradient(loss, student.trainable_variables))


def test_model_gradient_is_the_weighted_sum_of_the_term_gradients():
    network = nested_network(1)
    weights = (0.5, 2.0, 3.0)
    model = MatTAModel(network, loss_weights=weights)
    x, y = data(1)
    targets = losses.label_targets(y, "binary")
    with tf.GradientTape() as tape:
        total = model.compute_loss(y=y, y_pred=model(x))
    got = tape.gradient(total, network.trainable_variables)
    terms = [
        lambda s, t: losses.student_loss(targets, s, "binary"),
        lambda s, t: losses.ta_loss(targets, t, "binary"),
        lambda s, t: losses.distillation_loss(s, t, "binary"),
    ]
    term_grads = [gradients(network, term, x) for term in terms]
    for variable, grad in zip(network.trainable_variables, got, strict=True):
        expected = sum(w * ops.convert_to_numpy(g[variable.path]) for w, g in zip(weights, term_grads, strict=True))
        np.testing.assert_allclose(ops.convert_to_numpy(grad), expected, rtol=1e-5, atol=1e-7, err_msg=variable.path)


def test_a_training_step_on_distillation_alone_leaves_ta_only_parameters_unchanged():
    network = nested_network(1)
    model = MatTAModel(network, loss_weights=(0.0, 0.0, 1.0))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    before = {v.path: ops.convert_to_numpy(v) for v in network.trainable_variables}
    x, y = data(1)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for path, mask in student_masks(network).items():
        after = ops.convert_to_numpy(next(v for v in network.trainable_variables if v.path == path))
        np.testing.assert_array_equal(after[mask == 0], before[path][mask == 0], err_msg=path)
        assert np.any(after[mask == 1] != before[path][mask == 1]), path
