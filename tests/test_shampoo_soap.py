"""`Shampoo(preconditioner="soap")` against an independent numpy implementation of SOAP."""

import keras
import numpy as np
import pytest

from matta_tf.optimizers import Shampoo

BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-7
LEARNING_RATE = 0.01


def _soap_reference(initial, gradients, period, start=1, reproject=True):
    """SOAP in numpy (float64) for a matrix or a vector, one block, statistics every step.

    Order within a step, as the optimizer documents it: add `G G^T` to the factors; on refresh steps
    take new eigenbases (carrying the first moment into them); then Adam in the bases, rotated back.
    """
    weights = np.array(initial, np.float64)
    shape = weights.shape
    statistics = [np.zeros((n, n)) for n in shape]
    bases = [np.eye(n) for n in shape]
    first, second = np.zeros(shape), np.zeros(shape)

    def into(x, qs, back=False):
        qs = [q.T if back else q for q in qs]
        if len(shape) == 1:
            return qs[0].T @ x
        return qs[0].T @ x @ qs[1]

    for step, gradient in enumerate(gradients, start=1):
        gradient = np.asarray(gradient, np.float64)
        if len(shape) == 1:
            statistics[0] += np.outer(gradient, gradient)
        else:
            statistics[0] += gradient @ gradient.T
            statistics[1] += gradient.T @ gradient
        if step >= start and (step - start) % period == 0:
            new = [np.linalg.eigh(s)[1] for s in statistics]
            if reproject:
                first = into(first, [old.T @ q for old, q in zip(bases, new, strict=True)])
            bases = new
        rotated = into(gradient, bases)
        first = BETA1 * first + (1 - BETA1) * rotated
        second = BETA2 * second + (1 - BETA2) * rotated**2
        correction = np.sqrt(1 - BETA2**step) / (1 - BETA1**step)
        direction = first * correction / (np.sqrt(second) + EPSILON)
        weights -= LEARNING_RATE * into(direction, bases, back=True)
    return weights


def _soap(**kwargs):
    options = dict(
        learning_rate=LEARNING_RATE, preconditioner="soap", start_preconditioning_step=1,
        preconditioning_compute_steps=1, statistics_compute_steps=1, block_size=16,
        gradient_norm_bound=None, grafting_beta1=BETA1, grafting_beta2=BETA2, grafting_epsilon=EPSILON,
    )
    options.update(kwargs)
    return Shampoo(**options)


def _run(optimizer, initial, gradients, name="kernel", dtype="float32"):
    variable = keras.Variable(np.array(initial, dtype), name=name)
    for gradient in gradients:
        optimizer.apply_gradients([(np.array(gradient, dtype), variable)])
    return np.asarray(variable.numpy(), np.float64)


@pytest.mark.parametrize("period", [1, 3])
def test_matrix_matches_numpy_reference(period):
    # The first bases come at step 2, when the 6 x 6 factor has full rank: the eigenbasis of a
    # rank-deficient factor is arbitrary in its null space, where `v'` (kept across refreshes, not
    # rotated) would then depend on that choice.
    rng = np.random.default_rng(period)
    initial = rng.normal(size=(6, 4))
    gradients = [rng.normal(size=(6, 4)) for _ in range(8)]
    optimizer = _soap(start_preconditioning_step=2, preconditioning_compute_steps=period)
    result = _run(optimizer, initial, gradients)
    expected = _soap_reference(initial, gradients, period, start=2)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert int(optimizer.preconditioner_failures) == 0
    # The test can tell SOAP from Adam and from SOAP that forgets to carry the first moment over.
    adam = _run(keras.optimizers.Adam(LEARNING_RATE, BETA1, BETA2, EPSILON), initial, gradients)
    assert np.max(np.abs(result - adam)) > 1e-3
    if period > 1:
        stale = _soap_reference(initial, gradients, period, start=2, reproject=False)
        assert np.max(np.abs(result - stale)) > 1e-4


def test_first_step_basis_matches_in_float64():
    # Bases from step 1 on, refreshed every step. The first factor is rank-deficient, and Adam in its
    # eigenbasis divides the null directions' rounding noise by `sqrt(v') + eps`, about as small, so
    # only float64 rounding (not float32's) is small enough for a tight comparison.
    rng = np.random.default_rng(5)
    initial = rng.normal(size=(6, 4))
    gradients = [rng.normal(size=(6, 4)) for _ in range(6)]
    result = _run(_soap(), initial, gradients, dtype="float64")
    np.testing.assert_allclose(result, _soap_reference(initial, gradients, period=1), atol=1e-8)


def test_later_start_is_adam_until_then():
    rng = np.random.default_rng(7)
    initial = rng.normal(size=(6, 4))
    gradients = [rng.normal(size=(6, 4)) for _ in range(6)]
    result = _run(_soap(start_preconditioning_step=4, preconditioning_compute_steps=2), initial, gradients)
    expected = _soap_reference(initial, gradients, period=2, start=4)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    adam = _run(keras.optimizers.Adam(LEARNING_RATE, BETA1, BETA2, EPSILON), initial, gradients[:3])
    np.testing.assert_allclose(
        _run(_soap(start_preconditioning_step=4), initial, gradients[:3]), adam, atol=1e-6
    )


def test_bias_with_full_factor_matches_reference():
    rng = np.random.default_rng(3)
    initial = rng.normal(size=(5,))
    gradients = [rng.normal(size=(5,)) for _ in range(6)]
    gradients = gradients + [rng.normal(size=(5,)) for _ in range(3)]
    optimizer = _soap(diagonal_rank1=False, start_preconditioning_step=6, preconditioning_compute_steps=2)
    result = _run(optimizer, initial, gradients, name="bias")
    np.testing.assert_allclose(result, _soap_reference(initial, gradients, period=2, start=6), atol=1e-5)


def test_diagonal_bias_and_embedding_table_take_adam():
    # A diagonal factor is not rotated, and an embedding table keeps the grafted method (Adam).
    rng = np.random.default_rng(4)
    for shape, name in (((5,), "bias"), ((7, 3), "embeddings")):
        initial = rng.normal(size=shape)
        gradients = [rng.normal(size=shape) for _ in range(4)]
        optimizer = _soap()
        result = _run(optimizer, initial, gradients, name=name)
        adam = _run(keras.optimizers.Adam(LEARNING_RATE, BETA1, BETA2, EPSILON), initial, gradients, name=name)
        np.testing.assert_allclose(result, adam, atol=1e-6)
    assert optimizer._factor_groups[0] == []  # the table keeps no factors


def test_state_has_bases_and_no_roots():
    optimizer = _soap()
    optimizer.build([keras.Variable(np.zeros((6, 4), np.float32), name="kernel")])
    names = sorted(v.name for v in optimizer.variables)
    assert any(name.endswith("full6_eigenvectors") for name in names)
    assert not any("_root" in name for name in names)


def test_get_config_round_trip():
    optimizer = _soap(preconditioning_compute_steps=5)
    config = optimizer.get_config()
    assert config["preconditioner"] == "soap"
    assert config["eigenbasis_compute_steps"] is None
    restored = Shampoo.from_config(config)
    assert restored.preconditioner == "soap"
    assert restored.get_config() == config
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).preconditioner == "soap"
    assert Shampoo().get_config()["preconditioner"] == "shampoo"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preconditioner": "adam"}, "`preconditioner` should be one of .*Received: `preconditioner='adam'`"),
        ({"preconditioner": "soap", "grafting": "sgd"}, "needs `grafting='adam'`. Received: `grafting='sgd'`"),
        (
            {"preconditioner": "soap", "root_method": "newton"},
            "needs `root_method='eigh'`. Received: `root_method='newton'`",
        ),
        (
            {"preconditioner": "soap", "eigenbasis_compute_steps": 20},
            "Received: `eigenbasis_compute_steps=20`",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shampoo(**kwargs)


def test_fit_reduces_loss():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=(256, 1))
    features = rng.normal(size=(256, 8)).astype("float32")
    targets = (features @ rng.normal(size=(8, 1)) + 0.1 * ids).astype("float32")
    id_input, feature_input = keras.Input((1,), dtype="int32"), keras.Input((8,))
    embedded = keras.layers.Flatten()(keras.layers.Embedding(20, 4)(id_input))
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([embedded, feature_input]))
    model = keras.Model([id_input, feature_input], keras.layers.Dense(1)(hidden))
    model.compile(
        optimizer=Shampoo(
            learning_rate=0.01, preconditioner="soap", start_preconditioning_step=5,
            preconditioning_compute_steps=4, statistics_compute_steps=1,
        ),
        loss="mse",
    )
    history = model.fit([ids, features], targets, batch_size=32, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    assert model.optimizer.fault_counts()["preconditioner_failures"] == 0


def test_eigenbasis_guards_non_finite_input():
    from matta_tf.optimizers import matrix_functions

    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 3))
    good = a @ a.T  # rank-deficient: no damping needed for a basis
    stacked = np.stack([good, np.full((4, 4), np.nan)]).astype(np.float32)
    result = matrix_functions.eigenbasis(stacked)
    assert result.ok.numpy().tolist() == [True, False]
    basis = result.eigenvectors.numpy()
    rayleigh = basis[0].T @ good @ basis[0]
    np.testing.assert_allclose(rayleigh, np.diag(np.linalg.eigvalsh(good)), atol=1e-4)
    np.testing.assert_array_equal(basis[1], np.eye(4))


def test_xla_step_matches_eager():
    import tensorflow as tf

    rng = np.random.default_rng(9)
    initial = rng.normal(size=(6, 4)).astype("float32")
    gradients = [rng.normal(size=(6, 4)).astype("float32") for _ in range(4)]
    eager = _run(_soap(start_preconditioning_step=2, preconditioning_compute_steps=2), initial, gradients)
    variable = keras.Variable(initial, name="kernel")
    optimizer = _soap(start_preconditioning_step=2, preconditioning_compute_steps=2)
    optimizer.build([variable])
    step = tf.function(lambda g: optimizer.apply([g], [variable]), jit_compile=True)
    for gradient in gradients:
        step(tf.constant(gradient))
    np.testing.assert_allclose(variable.numpy(), eager, atol=1e-4)
