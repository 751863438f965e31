"""Shampoo under fault injection inside `MatTAModel.fit`: NaN, inf, huge-but-finite and outlier batches
never poison the weights or the optimizer state, and the model ends as good as a clean run."""

import keras
import numpy as np
import pytest

from matta_tf.layers.nested_dense import NestedDense
from matta_tf.optimizers import Shampoo, ShampooFaultCounters
from matta_tf.training import MatTAModel

FEATURES = 8
BATCH = 64
STEPS = 320
# Batch index -> fault. "weight" faults set every sample weight of the batch; "feature" puts the value
# into one feature of one example (NaN activations, so NaN gradients).
FAULTS = {
    25: ("weight", np.nan),
    60: ("weight", np.inf),
    95: ("weight", 1e30),
    130: ("feature", np.nan),
    165: ("weight", 1e25),
    200: ("feature", np.inf),
    235: ("weight", 1e38),
    270: ("weight", 1e8),  # finite squares: caught by the norm bound, not by finiteness
    300: ("weight", 1e30),
}


def nested_network(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    hidden = NestedDense(8, 32, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, list(NestedDense(1, 1, name="logits")(hidden)), name="nested")


def data(seed=0):
    rng = np.random.default_rng(seed)
    n = BATCH * STEPS + 4000
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    w = rng.normal(size=FEATURES)
    logit = x @ w + 0.8 * np.sin(2.0 * x[:, 0] * x[:, 1]) + rng.normal(size=n) * 0.5
    y = (logit > 0).astype("int64")
    split = BATCH * STEPS
    return (x[:split], y[:split]), (x[split:], y[split:])


def weighted_data(faults):
    (x, y), test = data()
    x, weights = x.copy(), np.ones(len(y), "float32")
    for batch, (kind, value) in faults.items():
        rows = slice(batch * BATCH, (batch + 1) * BATCH)
        if kind == "weight":
            weights[rows] = value
        else:
            x[batch * BATCH + 3, 2] = value
    return x, y, weights, test


def test_faults_inside_matta_fit_never_poison_weights_or_state():
    model = MatTAModel(nested_network())
    optimizer = Shampoo(0.01, start_preconditioning_step=20)
    model.compile(optimizer=optimizer)
    model.build((None, FEATURES))
    optimizer.build(model.trainable_variables)
    # One compiled model trains twice (compiling dominates this test's time): the clean run, then the
    # same initial weights and optimizer state trained with the faults.
    initial = [v.numpy() for v in model.weights + optimizer.variables]
    results = {}
    for name, faults in (("clean", {}), ("faults", FAULTS)):
        for variable, value in zip(model.weights + optimizer.variables, initial, strict=True):
            variable.assign(value)
        x, y, weights, (x_test, y_test) = weighted_data(faults)
        history = model.fit(
            x, y, sample_weight=weights, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[ShampooFaultCounters()],
        )
        auc = model.evaluate(x_test, y_test, batch_size=len(y_test), verbose=0, return_dict=True)["student_auc"]
        results[name] = dict(history=history.history, auc=auc, counts=optimizer.fault_counts())

    assert int(optimizer.iterations) == STEPS
    for variable in model.weights:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    for variable in optimizer.variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    # Every parameter's update is skipped on every faulty batch (all their gradients are hit), and
    # nothing else is: the clean run skips nothing.
    parameters = len(model.trainable_variables)
    assert results["clean"]["counts"]["skipped_updates"] == 0
    assert results["faults"]["counts"]["skipped_updates"] == len(FAULTS) * parameters
    assert results["faults"]["counts"]["outlier_updates"] == parameters  # the 1e8 batch
    history = results["faults"]["history"]
    assert history["shampoo_skipped_updates"] == [len(FAULTS) * parameters]
    assert history["shampoo_outlier_updates"] == [parameters]
    assert history["shampoo_preconditioner_failures"] == [0]
    clean_auc, auc = results["clean"]["auc"], results["faults"]["auc"]
    assert clean_auc > 0.85  # the task is learnt
    assert abs(auc - clean_auc) < 0.01, (auc, clean_auc)


@pytest.mark.slow
def test_one_outlier_batch_without_the_guard_costs_the_model():
    """The guard matters: with the norm bound off (`gradient_norm_bound=None`) one 1e8-weighted batch
    (finite squares) inflates Adam's second moments ~1e12x and training stalls; with it on, the batch
    is skipped."""
    x, y, weights, (x_test, y_test) = weighted_data({5: ("weight", 1e8)})
    aucs = {}
    for bound in (100.0, None):
        model = MatTAModel(nested_network())
        optimizer = Shampoo(0.01, start_preconditioning_step=20, gradient_norm_bound=bound)
        model.compile(optimizer=optimizer)
        steps = 100 * BATCH
        model.fit(x[:steps], y[:steps], sample_weight=weights[:steps], batch_size=BATCH, shuffle=False, verbose=0)
        aucs[bound] = model.evaluate(x_test, y_test, batch_size=len(y_test), verbose=0, return_dict=True)["student_auc"]
        for variable in optimizer.variables:
            assert np.all(np.isfinite(variable.numpy())), (bound, variable.path)
    assert aucs[100.0] > 0.8 and aucs[None] < aucs[100.0] - 0.05, aucs
