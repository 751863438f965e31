"""MatTA losses: eqs. (1)-(3), the composite loss and the distillation ramp against numpy transcriptions."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from keras import ops

from matta_tf.data import Label
from matta_tf.training import DistillationSchedule, MatTAModel, losses

NUM_CLASSES = 5
BATCH = 16


# ---- numpy transcription of the paper: explicit class distributions, -sum_i t_i log p_i ----------------
def np_distribution(logits: np.ndarray, task: str) -> np.ndarray:
    """Class probabilities; a binary logit z gives the 2-class distribution [1 - sigmoid(z), sigmoid(z)]."""
    logits = logits.astype(np.float64)
    if task == "binary":
        positive = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        return np.stack([1.0 - positive, positive], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def np_targets(labels: np.ndarray, task: str, representation: str) -> np.ndarray:
    if representation == "class_index":
        width = 2 if task == "binary" else NUM_CLASSES
        return np.eye(width)[labels.reshape(-1)]
    if representation == "logits":
        return np_distribution(labels.reshape(len(labels), -1), task)
    if task == "binary":
        positive = labels.reshape(-1).astype(np.float64)
        return np.stack([1.0 - positive, positive], axis=1)
    return labels.astype(np.float64)


def np_cross_entropy(targets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    return -(targets * np.log(probabilities)).sum(axis=1)


def np_terms(labels, student_logits, ta_logits, task, representation):
    """Per-example (L_S, L_TA, L_D), eqs. (1)-(3)."""
    y = np_targets(labels, task, representation)
    p_student, p_ta = np_distribution(student_logits, task), np_distribution(ta_logits, task)
    return np_cross_entropy(y, p_student), np_cross_entropy(y, p_ta), np_cross_entropy(p_ta, p_student)


def fixed_case(task: str, representation: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    width = 1 if task == "binary" else NUM_CLASSES
    student_logits = rng.normal(scale=2.0, size=(BATCH, width)).astype("float32")
    ta_logits = rng.normal(scale=2.0, size=(BATCH, width)).astype("float32")
    if representation == "class_index":
        labels = rng.integers(0, 2 if task == "binary" else NUM_CLASSES, size=BATCH).astype("int64")
    elif representation == "logits":
        labels = rng.normal(scale=2.0, size=(BATCH,) if task == "binary" else (BATCH, NUM_CLASSES))
    elif task == "binary":
        labels = rng.uniform(size=BATCH)
    else:
        labels = rng.dirichlet(np.ones(NUM_CLASSES), size=BATCH)
    return labels.astype("int64" if representation == "class_index" else "float32"), student_logits, ta_logits


CASES = [(task, rep) for task in ("binary", "multiclass") for rep in ("class_index", "probabilities", "logits")]


@pytest.mark.parametrize("task,representation", CASES)
def test_loss_terms_match_equations_1_to_3(task, representation):
    labels, student_logits, ta_logits = fixed_case(task, representation)
    targets = losses.label_targets(ops.convert_to_tensor(labels), task, representation, NUM_CLASSES)
    expected = np_terms(labels, student_logits, ta_logits, task, representation)
    got = (
        losses.student_loss(targets, student_logits, task),
        losses.ta_loss(targets, ta_logits, task),
        losses.distillation_loss(student_logits, ta_logits, task),
    )
    for name, want, value in zip(("L_S", "L_TA", "L_D"), expected, got, strict=True):
        assert tuple(value.shape) == (BATCH,), name
        np.testing.assert_allclose(ops.convert_to_numpy(value), want, rtol=2e-5, atol=2e-6, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(
    task=st.sampled_from(["binary", "multiclass"]),
    logits=arrays(np.float32, (2, 6, 3), elements=st.floats(-30, 30, width=32)),
)
def test_distillation_loss_is_ta_entropy_plus_a_non_negative_kl(task, logits):
    # Gibbs: L_D = H(p_TA) + KL(p_TA || p_S) >= H(p_TA), with equality when the Student equals the TA.
    student_logits, ta_logits = (logits[:, :, :1] if task == "binary" else logits)
    distill = ops.convert_to_numpy(losses.distillation_loss(student_logits, ta_logits, task))
    entropy = ops.convert_to_numpy(losses.distillation_loss(ta_logits, ta_logits, task))
    p_ta = np_distribution(ta_logits, task)
    with np.errstate(divide="ignore", invalid="ignore"):
        np_entropy = -np.nansum(np.where(p_ta > 0, p_ta * np.log(p_ta), 0.0), axis=1)
    np.testing.assert_allclose(entropy, np_entropy, rtol=1e-3, atol=1e-4)
    assert np.all(distill >= entropy - 1e-4)


def test_binary_losses_accept_labels_with_a_trailing_axis():
    labels, student_logits, _ = fixed_case("binary", "probabilities")
    flat = losses.label_targets(labels, "binary", "probabilities")
    column = losses.label_targets(labels[:, None], "binary", "probabilities")
    np.testing.assert_array_equal(ops.convert_to_numpy(flat), ops.convert_to_numpy(column))
    assert tuple(flat.shape) == (BATCH, 1)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_losses_are_finite_and_exact_for_extreme_logits(task):
    # log(sigmoid(-80)) underflows as the log of a probability in float32; from logits it is -80.
    width = 1 if task == "binary" else 3
    confident = np.full((2, width), -80.0, "float32")
    confident[:, 0] = 80.0  # a confident positive (binary) or a confident class 0
    targets = np.zeros((2, width), "float32")
    if task == "binary":
        expected = [80.0, 80.0]  # label 0: -log(1 - sigmoid(80)) = 80 + log(1 + e^-80)
    else:
        targets[:, 1] = 1.0  # class 1: -log softmax = 160 + log(1 + 2 e^-160)
        expected = [160.0, 160.0]
    value = ops.convert_to_numpy(losses.student_loss(targets, confident, task))
    assert np.all(np.isfinite(value))
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    distill = ops.convert_to_numpy(losses.distillation_loss(confident, -confident, task))
    assert np.all(np.isfinite(distill))


def test_hard_targets_and_disagreement_match_numpy():
    rng = np.random.default_rng(3)
    soft = rng.uniform(size=(BATCH, 1)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(losses.hard_targets(soft, "binary")), soft >= 0.5)
    distribution = rng.dirichlet(np.ones(NUM_CLASSES), size=BATCH).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(losses.hard_targets(distribution, "multiclass")),
        np.eye(NUM_CLASSES)[distribution.argmax(axis=1)],
    )
    student, ta = rng.normal(size=(2, BATCH, 1)).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(losses.disagreement(student, ta, "binary")), (student[:, 0] >= 0) != (ta[:, 0] >= 0)
    )
    student, ta = rng.normal(size=(2, BATCH, NUM_CLASSES)).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(losses.disagreement(student, ta, "multiclass")),
        student.argmax(axis=1) != ta.argmax(axis=1),
    )


# ---- the distillation ramp ------------------------------------------------------------------------------
def np_ramp(step: int, start: int, ramp: int, curve: str) -> float:
    if step < start:
        return 0.0
    if ramp == 0:
        return 1.0
    progress = min(1.0, (step - start) / ramp)
    return progress if curve == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "start,ramp,curve", [(0, 0, "linear"), (5, 0, "linear"), (3, 10, "linear"), (3, 10, "cosine"), (0, 7, "cosine")]
)
def test_schedule_matches_its_formula(start, ramp, curve):
    schedule = DistillationSchedule(start, ramp, curve)
    for step in range(0, start + ramp + 5):
        assert float(schedule(step)) == pytest.approx(np_ramp(step, start, ramp, curve), abs=1e-6), step
    assert float(schedule(ops.convert_to_tensor(10**6, "int64"))) == 1.0


def test_schedule_round_trips_and_rejects_bad_values():
    schedule = DistillationSchedule(start_step=100, ramp_steps=400, curve="cosine")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored == schedule and restored is not schedule
    with pytest.raises(ValueError, match=r"`ramp_steps` must be a non-negative integer. Received: ramp_steps=-1"):
        DistillationSchedule(ramp_steps=-1)
    with pytest.raises(ValueError, match=r"`curve` must be one of \['linear', 'cosine'\]. Received: curve='exp'"):
        DistillationSchedule(curve="exp")


# ---- the composite loss of the model ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["matta", "student_only", "ta_only"])
@pytest.mark.parametrize("task,representation", [("binary", "class_index"), ("multiclass", "logits")])
def test_model_loss_is_the_weighted_sum_with_the_ramp_at_the_optimizer_step(mode, task, representation):
    labels, student_logits, ta_logits = fixed_case(task, representation, seed=1)
    sample_weight = np.random.default_rng(2).uniform(0.0, 2.0, size=BATCH).astype("float32")
    width = student_logits.shape[1]
    inputs = keras.Input((3,))
    network = keras.Model(inputs, [keras.layers.Dense(width)(inputs), keras.layers.Dense(width)(inputs)])
    label = Label(
        "y",
        source="teacher" if representation != "class_index" else "event",
        task=task,
        num_classes=2 if task == "binary" else NUM_CLASSES,
        representation=representation,
    )
    weights = (0.7, 1.3, 2.5)
    schedule = DistillationSchedule(start_step=2, ramp_steps=8, curve="cosine")
    model = MatTAModel(network, label=label, mode=mode, loss_weights=weights, distillation_schedule=schedule)
    model.compile(optimizer=keras.optimizers.SGD())
    model.optimizer.iterations.assign(6)

    y_pred = {"student": ops.convert_to_tensor(student_logits), "ta": ops.convert_to_tensor(ta_logits)}
    total = model.compute_loss(y=ops.convert_to_tensor(labels), y_pred=y_pred, sample_weight=sample_weight)

    l_s, l_ta, l_d = (
        np.sum(sample_weight * term) / BATCH
        for term in np_terms(labels, student_logits, ta_logits, task, representation)
    )
    w_d = weights[2] * np_ramp(6, 2, 8, "cosine")
    expected = {
        "matta": weights[0] * l_s + weights[1] * l_ta + w_d * l_d,
        "student_only": weights[0] * l_s,
        "ta_only": weights[1] * l_ta,
    }[mode]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    if mode == "matta":
        assert float(model.distillation_weight()) == pytest.approx(w_d, rel=1e-6)
