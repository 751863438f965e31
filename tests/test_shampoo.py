"""Shampoo against a numpy transcription of its formulas, against Keras's own optimizers, and under
fault injection, tf.distribute, checkpoint resume and XLA."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.optimizers import Shampoo, matrix_functions, partition
from matta_tf.optimizers import grafting as grafting_lib


# ---------------------------------------------------------------------------------------------
# The oracle: a numpy transcription of the docstring's formulas, independent of the package
# (plain loops over blocks and dimensions, numpy's eigh in float64, each grafted method's Keras
# formula written out again).
# ---------------------------------------------------------------------------------------------
def inverse_root(matrix, root, epsilon, relative):
    eigenvalues, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    if relative:
        largest = eigenvalues.max()
        if largest <= 0:
            return np.eye(len(matrix))
        eigenvalues = eigenvalues + epsilon * largest
    else:
        eigenvalues = eigenvalues + epsilon
    return (vectors * eigenvalues ** (-1.0 / root)) @ vectors.T


def inverse_root_in_basis(matrix, vectors, root, epsilon, relative):
    """The root with the eigenvalues replaced by the Rayleigh quotients q_i^T A q_i of a stored basis."""
    quotients = np.maximum(np.einsum("ji,jk,ki->i", vectors, matrix, vectors), 0.0)
    if relative:
        largest = quotients.max()
        if largest <= 0:
            return np.eye(len(matrix))
        quotients = quotients + epsilon * largest
    else:
        quotients = quotients + epsilon
    return (vectors * quotients ** (-1.0 / root)) @ vectors.T


def diagonal_inverse_root(diagonal, root, epsilon, relative):
    diagonal = np.maximum(diagonal, 0.0)
    if relative:
        largest = diagonal.max()
        if largest <= 0:
            return np.ones_like(diagonal)
        return (diagonal + epsilon * largest) ** (-1.0 / root)
    return (diagonal + epsilon) ** (-1.0 / root)


# Shampoo's default statistics period (the reference mirrors every default).
DEFAULT_STATISTICS_STEPS = 10


class ReferenceShampoo:
    """Shampoo on a list of numpy parameters; `step(params, grads)` returns the new parameters."""

    def __init__(
        self,
        shapes,
        learning_rate=0.1,
        beta2=1.0,
        momentum=0.0,
        nesterov=False,
        epsilon=1e-6,
        relative_epsilon=True,
        grafting="adam",
        grafting_beta1=0.9,
        grafting_beta2=0.999,
        grafting_epsilon=1e-7,
        start_preconditioning_step=100,
        preconditioning_compute_steps=10,
        statistics_compute_steps=DEFAULT_STATISTICS_STEPS,
        block_size=128,
        diagonal_threshold=4096,
        diagonal_rank1=True,
        roots=None,
        weight_decay=0.0,
        eigenbasis_compute_steps="auto",
    ):
        if eigenbasis_compute_steps == "auto":  # the docstring's rule
            exact = preconditioning_compute_steps == 1
            eigenbasis_compute_steps = None if exact else 10 * preconditioning_compute_steps
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.t = 0
        self.params = []
        for index, shape in enumerate(shapes):
            shape = tuple(shape) or (1,)
            diagonal = [d > diagonal_threshold or (diagonal_rank1 and len(shape) == 1) for d in shape]
            ranges = []
            for d, is_diagonal in zip(shape, diagonal, strict=True):
                if is_diagonal:
                    ranges.append([(0, d)])
                else:
                    ranges.append([(s, min(s + block_size, d)) for s in range(0, d, block_size)])
            blocks = []
            for block_ranges in itertools.product(*ranges):
                sizes = [b - a for a, b in block_ranges]
                stats = [np.zeros(s) if dg else np.zeros((s, s)) for s, dg in zip(sizes, diagonal, strict=True)]
                roots_ = [np.ones(s) if dg else np.eye(s) for s, dg in zip(sizes, diagonal, strict=True)]
                bases = [None] * len(sizes)
                blocks.append(
                    {"slices": tuple(slice(a, b) for a, b in block_ranges), "stats": stats, "roots": roots_,
                     "bases": bases}
                )
            root = (roots or {}).get(index, 2 * len(shape))
            self.params.append(
                {
                    "shape": shape,
                    "diagonal": diagonal,
                    "blocks": blocks,
                    "root": root,
                    "m": np.zeros(shape),
                    "v": np.zeros(shape),
                    "buffer": np.zeros(shape),
                }
            )

    def _graft(self, state, g):
        t = self.t
        if self.grafting in ("none", "sgd"):
            return g, g
        if self.grafting == "adagrad":
            state["v"] = state["v"] + g**2
            return g / np.sqrt(state["v"] + self.grafting_epsilon), g
        if self.grafting == "rmsprop":
            state["v"] = self.grafting_beta2 * state["v"] + (1 - self.grafting_beta2) * g**2
            return g / np.sqrt(state["v"] + self.grafting_epsilon), g
        b1, b2 = self.grafting_beta1, self.grafting_beta2
        state["m"] = state["m"] + (g - state["m"]) * (1 - b1)
        state["v"] = state["v"] + (g**2 - state["v"]) * (1 - b2)
        alpha = np.sqrt(1 - b2**t) / (1 - b1**t)
        return alpha * state["m"] / (np.sqrt(state["v"]) + self.grafting_epsilon), state["m"]

    def step(self, params, grads):
        self.t += 1
        t = self.t
        lr = self.learning_rate
        out = []
        for param, grad, state in zip(params, grads, self.params, strict=True):
            param = param - param * self.weight_decay * lr
            g = np.reshape(grad, state["shape"])
            rank = len(state["shape"])
            if (t - 1) % self.statistics_compute_steps == 0:
                for block in state["blocks"]:
                    gb = g[block["slices"]]
                    for dim in range(rank):
                        others = [a for a in range(rank) if a != dim]
                        if state["diagonal"][dim]:
                            term = np.sum(gb**2, axis=tuple(others))
                        else:
                            term = np.tensordot(gb, gb, axes=(others, others))
                        old = block["stats"][dim]
                        block["stats"][dim] = (
                            old + term if self.beta2 == 1.0 else self.beta2 * old + (1 - self.beta2) * term
                        )
            preconditioning = t >= self.start_preconditioning_step
            if preconditioning and (t - self.start_preconditioning_step) % self.preconditioning_compute_steps == 0:
                for block in state["blocks"]:
                    for dim in range(rank):
                        stat = block["stats"][dim]
                        if state["diagonal"][dim]:
                            block["roots"][dim] = diagonal_inverse_root(
                                stat, state["root"], self.epsilon, self.relative_epsilon
                            )
                        elif self.eigenbasis_compute_steps is None:
                            block["roots"][dim] = inverse_root(stat, state["root"], self.epsilon, self.relative_epsilon)
                        else:
                            if (t - self.start_preconditioning_step) % self.eigenbasis_compute_steps == 0:
                                block["bases"][dim] = np.linalg.eigh(0.5 * (stat + stat.T))[1]
                            block["roots"][dim] = inverse_root_in_basis(
                                stat, block["bases"][dim], state["root"], self.epsilon, self.relative_epsilon
                            )
            direction, shampoo_input = self._graft(state, g)
            if preconditioning:
                update = np.zeros(state["shape"])
                for block in state["blocks"]:
                    pb = shampoo_input[block["slices"]]
                    for dim in range(rank):
                        root = block["roots"][dim]
                        if state["diagonal"][dim]:
                            shape = [1] * rank
                            shape[dim] = -1
                            pb = pb * root.reshape(shape)
                        else:
                            pb = np.moveaxis(np.tensordot(root, pb, axes=([1], [dim])), 0, dim)
                    if self.grafting != "none":
                        norm = np.linalg.norm(pb)
                        pb = pb * (np.linalg.norm(direction[block["slices"]]) / norm if norm > 0 else 0.0)
                    update[block["slices"]] = pb
            else:
                update = direction
            if self.momentum > 0:
                state["buffer"] = self.momentum * state["buffer"] + update
                update = update + self.momentum * state["buffer"] if self.nesterov else state["buffer"]
            out.append(param - lr * update.reshape(np.shape(param)))
        return out


# ---------------------------------------------------------------------------------------------
# A small regression with a matrix, a vector and a 3-D parameter.
# ---------------------------------------------------------------------------------------------
def regression_problem(seed=0):
    rng = np.random.default_rng(seed)
    data = (
        rng.normal(size=(32, 5)),
        rng.normal(size=(32, 4)),
        rng.normal(size=(32, 3)),
        rng.normal(size=(32, 3, 2)),
    )
    init = [rng.normal(size=(5, 3)) * 0.5, rng.normal(size=(3,)) * 0.1, rng.normal(size=(4, 3, 2)) * 0.5]
    return data, init


def numpy_gradients(params, data):
    """Gradients of 0.5/n sum ||x W + b - y||^2 + 0.5/n sum ||x3 . T - y3||^2."""
    weight, bias, tensor = params
    x, x3, y, y3 = data
    n = len(x)
    residual = (x @ weight + bias - y) / n
    residual3 = (np.einsum("na,ajk->njk", x3, tensor) - y3) / n
    return [x.T @ residual, residual.sum(axis=0), np.einsum("na,njk->ajk", x3, residual3)]


def run_optimizer(optimizer, init, data, steps, dtype, jit_compile=None):
    """Steps `optimizer` on the regression; returns the parameters after each step.

    Eager by default (fast to start); `jit_compile` wraps the step in a `tf.function`.
    """
    names = ["W", "b", "T"]
    variables = [keras.Variable(p, dtype=dtype, name=n) for p, n in zip(init, names, strict=True)]
    x, x3, y, y3 = (tf.constant(d, dtype) for d in data)

    def step():
        with tf.GradientTape() as tape:
            weight, bias, tensor = variables
            loss = 0.5 * tf.reduce_sum(tf.square(x @ weight + bias - y)) / 32
            loss += 0.5 * tf.reduce_sum(tf.square(tf.einsum("na,ajk->njk", x3, tensor) - y3)) / 32
        optimizer.apply(tape.gradient(loss, variables), variables)

    train_step = step if jit_compile is None else tf.function(step, jit_compile=jit_compile)
    trajectory = []
    for _ in range(steps):
        train_step()
        trajectory.append([v.numpy().astype(np.float64) for v in variables])
    return trajectory


def run_shampoo(init, data, steps, dtype, jit_compile=None, **kwargs):
    optimizer = Shampoo(**kwargs)
    return run_optimizer(optimizer, init, data, steps, dtype, jit_compile), optimizer


def run_reference(init, data, steps, **kwargs):
    reference = ReferenceShampoo([p.shape for p in init], **kwargs)
    params = [p.copy() for p in init]
    trajectory = []
    for _ in range(steps):
        params = reference.step(params, numpy_gradients(params, data))
        trajectory.append(params)
    return trajectory


def assert_trajectories_match(actual, expected, init, tolerance):
    """Compares displacements from the initial point, so that the tolerance applies to the steps."""
    for step, (actual_params, expected_params) in enumerate(zip(actual, expected, strict=True)):
        for a, e, p0 in zip(actual_params, expected_params, init, strict=True):
            error = np.linalg.norm((a - p0) - (e - p0)) / np.linalg.norm(e - p0)
            assert error < tolerance, f"step {step + 1}, shape {p0.shape}: relative error {error:.3g}"


CONTRACT = dict(
    learning_rate=0.125,
    grafting="none",
    beta2=1.0,
    momentum=0.0,
    epsilon=1e-3,
    relative_epsilon=False,
    start_preconditioning_step=1,
    preconditioning_compute_steps=1,
    statistics_compute_steps=1,
)
CONFIGURATIONS = {
    "contract": CONTRACT,
    "adam_blocks_diagonal_schedule": dict(
        learning_rate=0.0625,
        grafting="adam",
        beta2=0.875,
        momentum=0.5,
        nesterov=True,
        epsilon=1e-4,
        relative_epsilon=True,
        start_preconditioning_step=2,
        preconditioning_compute_steps=3,
        statistics_compute_steps=2,
        block_size=2,
        diagonal_threshold=4,
        weight_decay=0.0625,
    ),
    "rmsprop_momentum_rank1_diagonal": dict(
        learning_rate=0.03125,
        grafting="rmsprop",
        grafting_beta2=0.75,
        momentum=0.75,
        epsilon=1e-2,
        relative_epsilon=False,
        start_preconditioning_step=3,
        preconditioning_compute_steps=2,
        eigenbasis_compute_steps=None,
        diagonal_rank1=True,
    ),
    "adagrad": dict(
        learning_rate=0.25,
        grafting="adagrad",
        epsilon=1e-3,
        start_preconditioning_step=1,
        preconditioning_compute_steps=2,
        # A stored basis from a rank-deficient first factor is not unique: exact roots here.
        eigenbasis_compute_steps=None,
    ),
    "sgd_blocks": dict(
        learning_rate=0.125, grafting="sgd", block_size=3, start_preconditioning_step=2, preconditioning_compute_steps=1
    ),
    # Full eigendecompositions on steps 3 and 6, roots in the stored eigenbasis on steps 4 and 5 (the
    # factors have full rank and distinct eigenvalues by step 3, so the basis is unique up to signs).
    "adam_eigenbasis_reuse": dict(
        learning_rate=0.0625,
        grafting="adam",
        epsilon=1e-4,
        statistics_compute_steps=1,
        start_preconditioning_step=3,
        preconditioning_compute_steps=1,
        eigenbasis_compute_steps=3,
    ),
}
# The defaults before issue #20: rank-1 parameters with full factors, 1024-blocks, exact roots.
CONFIGURATIONS["previous_defaults_rank1_full"] = dict(
    learning_rate=0.0625, start_preconditioning_step=2, preconditioning_compute_steps=2, block_size=1024,
    diagonal_rank1=False, statistics_compute_steps=1, eigenbasis_compute_steps=None,
)
# Shampoo's own defaults but for the start step and root period (a stored basis every 20 steps by "auto").
# (From step 3 the factors have full rank, so the stored basis is unique up to signs.)
CONFIGURATIONS["defaults"] = dict(learning_rate=0.0625, start_preconditioning_step=3, preconditioning_compute_steps=2)
# exponent_override is per variable path in Shampoo and per parameter index in the reference.
OVERRIDES = {"rmsprop_momentum_rank1_diagonal": ({"^T$": 2, "W": 3}, {2: 2, 0: 3})}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_trajectory_matches_numpy_transcription(name, dtype, tolerance):
    data, init = regression_problem()
    config = CONFIGURATIONS[name]
    override, reference_roots = OVERRIDES.get(name, (None, None))
    actual, optimizer = run_shampoo(init, data, 6, dtype, exponent_override=override, **config)
    expected = run_reference(init, data, 6, roots=reference_roots, **config)
    if name == "defaults" and dtype == "float32":
        # One statistics update in 6 steps (every 10 by default): the stored basis of a rank-deficient
        # factor is not unique, and float32 rounding picks another basis of its null space.
        tolerance = 2e-3
    assert_trajectories_match(actual, expected, init, tolerance)
    assert int(optimizer.preconditioner_failures) == 0


def test_contract_single_step_formula():
    """The docstring's contract, written out for one step of a matrix parameter."""
    rng = np.random.default_rng(3)
    weight, gradient = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    variable = keras.Variable(weight, dtype="float64")
    optimizer = Shampoo(**CONTRACT)
    optimizer.apply([tf.constant(gradient)], [variable])
    left = inverse_root(gradient @ gradient.T, 4, 1e-3, False)
    right = inverse_root(gradient.T @ gradient, 4, 1e-3, False)
    np.testing.assert_allclose(variable.numpy(), weight - 0.125 * left @ gradient @ right, rtol=1e-12)
    # A second step uses the sums over both steps.
    second = rng.normal(size=(4, 3))
    optimizer.apply([tf.constant(second)], [variable])
    left = inverse_root(gradient @ gradient.T + second @ second.T, 4, 1e-3, False)
    right = inverse_root(gradient.T @ gradient + second.T @ second, 4, 1e-3, False)
    expected = weight - 0.125 * inverse_root(gradient @ gradient.T, 4, 1e-3, False) @ gradient @ inverse_root(
        gradient.T @ gradient, 4, 1e-3, False
    )
    np.testing.assert_allclose(variable.numpy(), expected - 0.125 * left @ second @ right, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# With preconditioning off, Shampoo is the grafted Keras optimizer.
# ---------------------------------------------------------------------------------------------
NEVER = 10**9


def small_model(seed=0, dtype="float32"):
    """Embedding (sparse gradients) + two Dense layers, with fixed initial weights."""
    user = keras.Input((), dtype="int32")
    dense_input = keras.Input((6,), dtype=dtype)
    embedded = keras.layers.Embedding(20, 4, dtype=dtype)(user)
    concatenated = keras.layers.Concatenate(dtype=dtype)([embedded, dense_input])
    hidden = keras.layers.Dense(8, activation="tanh", dtype=dtype)(concatenated)
    model = keras.Model([user, dense_input], keras.layers.Dense(1, dtype=dtype)(hidden))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(dtype) * 0.5 for w in model.get_weights()])
    return model


def small_data(seed=1, n=64):
    rng = np.random.default_rng(seed)
    features = [rng.integers(0, 20, n).astype("int32"), rng.normal(size=(n, 6)).astype("float32")]
    return features, rng.normal(size=(n, 1)).astype("float32")


def dense_model(seed=0):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype("float32") * 0.5 for w in model.get_weights()])
    return model


def fit(optimizer, epochs=2, jit_compile=False, model=None, run_eagerly=True):
    """`model.fit`, eagerly by default: tracing Shampoo's graph costs seconds a test can't spare."""
    model = model or small_model()
    dtype = model.inputs[-1].dtype
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.MeanSquaredError(dtype=dtype),
        jit_compile=jit_compile,
        run_eagerly=run_eagerly and not jit_compile,
    )
    (users, dense_features), targets = small_data()
    features = [users, dense_features.astype(dtype)] if len(model.inputs) == 2 else dense_features
    targets = targets.astype(dtype)
    model.fit(features, targets, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)


GRAFTING_EQUIVALENCES = {
    "sgd": (lambda: keras.optimizers.SGD(0.05), dict(learning_rate=0.05, grafting="sgd")),
    "sgd_momentum": (
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        dict(learning_rate=0.05, grafting="sgd", momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        dict(learning_rate=0.05, grafting="sgd", momentum=0.9, nesterov=True),
    ),
    "adagrad": (
        lambda: keras.optimizers.Adagrad(0.05, initial_accumulator_value=0.0),
        dict(learning_rate=0.05, grafting="adagrad"),
    ),
    "rmsprop": (
        lambda: keras.optimizers.RMSprop(0.01),
        dict(learning_rate=0.01, grafting="rmsprop", grafting_beta2=0.9),
    ),
    "adam": (lambda: keras.optimizers.Adam(0.01), dict(learning_rate=0.01, grafting="adam")),
    "adamw": (
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        dict(learning_rate=0.01, grafting="adam", weight_decay=0.1),
    ),
    "adam_schedule_clipnorm": (
        lambda: keras.optimizers.Adam(schedule(), clipnorm=0.1),
        dict(learning_rate=schedule(), grafting="adam", clipnorm=0.1),
    ),
}


@pytest.mark.parametrize("name", list(GRAFTING_EQUIVALENCES))
def test_grafting_alone_equals_keras_optimizer(name):
    # Dense gradients only: for an embedding's IndexedSlices, Keras's optimizers update their slots
    # on the touched rows alone (and square duplicate rows separately), whereas Shampoo grafts the
    # dense gradient's method.
    keras_optimizer, shampoo_kwargs = GRAFTING_EQUIVALENCES[name]
    data, init = regression_problem()
    expected = run_optimizer(keras_optimizer(), init, data, 6, "float32")
    shampoo = Shampoo(start_preconditioning_step=NEVER, **shampoo_kwargs)
    actual = run_optimizer(shampoo, init, data, 6, "float32")
    for actual_params, expected_params in zip(actual, expected, strict=True):
        for a, e in zip(actual_params, expected_params, strict=True):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6)


def test_grafting_alone_equals_keras_adam_under_model_fit():
    expected = fit(keras.optimizers.Adam(0.01), model=dense_model()).get_weights()
    actual = fit(Shampoo(0.01, start_preconditioning_step=NEVER), model=dense_model()).get_weights()
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_exponent_override_zero_leaves_a_parameter_to_the_grafted_method():
    # T's loss term is separate from W's and b's, so its trajectory is Adam's while W and b are
    # preconditioned; it keeps no factors.
    data, init = regression_problem()
    expected = run_optimizer(keras.optimizers.Adam(0.01), init, data, 5, "float32")
    actual, optimizer = run_shampoo(
        init, data, 5, "float32", learning_rate=0.01, exponent_override={"^T$": 0}, start_preconditioning_step=1
    )
    for actual_params, expected_params in zip(actual, expected, strict=True):
        np.testing.assert_allclose(actual_params[2], expected_params[2], rtol=2e-5, atol=1e-6)
        assert not np.allclose(actual_params[0], expected_params[0], rtol=1e-3)
    assert optimizer._statistics[2] == [] and len(optimizer._statistics[0]) == 2


# ---------------------------------------------------------------------------------------------
# Fault injection: the weights never become NaN because of the preconditioner.
# ---------------------------------------------------------------------------------------------
def make_variables(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,), (2, 3, 2)]
    return [keras.Variable(rng.normal(size=s).astype("float32")) for s in shapes]


def random_gradients(rng, scale=1.0):
    return [tf.constant(rng.normal(size=s).astype("float32") * scale) for s in [(4, 3), (3,), (2, 3, 2)]]


def assert_all_finite(variables):
    for v in variables:
        assert np.all(np.isfinite(v.numpy())), v.path


@pytest.mark.parametrize("grafting", ["none", "adam"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_skipped_and_counted(grafting, bad):
    variables = make_variables()
    optimizer = Shampoo(grafting=grafting, start_preconditioning_step=1, preconditioning_compute_steps=1)
    rng = np.random.default_rng(1)
    optimizer.apply(random_gradients(rng), variables)
    before = [v.numpy() for v in variables]
    poisoned = random_gradients(rng)
    poisoned[0] = tf.tensor_scatter_nd_update(poisoned[0], [[1, 2]], [bad])
    optimizer.apply(poisoned, variables)
    np.testing.assert_array_equal(variables[0].numpy(), before[0])  # skipped
    assert not np.array_equal(variables[1].numpy(), before[1])  # the others still step
    for _ in range(3):
        optimizer.apply(random_gradients(rng), variables)
    assert_all_finite(variables)
    assert int(optimizer.skipped_updates) == 1
    assert int(optimizer.preconditioner_failures) == 0
    for state in optimizer.variables:
        assert np.all(np.isfinite(state.numpy())), state.path


@pytest.mark.parametrize("grafting", ["none", "sgd", "adagrad", "rmsprop", "adam"])
def test_all_zero_gradients(grafting):
    variables = make_variables()
    before = [v.numpy() for v in variables]
    # An absolute epsilon of 0 makes the root of a zero factor infinite: it must fail, be counted
    # and be kept at its previous value.
    optimizer = Shampoo(
        grafting=grafting,
        epsilon=0.0,
        relative_epsilon=False,
        start_preconditioning_step=1,
        preconditioning_compute_steps=1,
    )
    zeros = [tf.zeros_like(v) for v in variables]
    for _ in range(3):
        optimizer.apply(zeros, variables)
    for v, b in zip(variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)
    assert int(optimizer.preconditioner_failures) > 0
    # The default relative epsilon takes the identity for a zero factor: no failure.
    relative = Shampoo(grafting=grafting, start_preconditioning_step=1, preconditioning_compute_steps=1)
    for _ in range(3):
        relative.apply(zeros, variables)
    assert int(relative.preconditioner_failures) == 0
    assert_all_finite(variables)


@pytest.mark.parametrize("scale", [1e38, 1e25, 1e15, 1e3, 1e-30, 1e-40])
@pytest.mark.parametrize("grafting", ["none", "sgd", "adam"])
def test_huge_and_tiny_gradient_scales(scale, grafting):
    variables = make_variables()
    optimizer = Shampoo(
        grafting=grafting, learning_rate=1e-3, start_preconditioning_step=1, preconditioning_compute_steps=1
    )
    rng = np.random.default_rng(2)
    for step in range(6):
        # Alternate the extreme scale with ordinary gradients, so that both meet the same state.
        optimizer.apply(random_gradients(rng, scale if step % 2 == 1 else 1.0), variables)
        assert_all_finite(variables)
    assert_all_finite(optimizer.variables)
    # Above the gradient-norm bound (100x the running norm) every parameter's update is skipped:
    # 3 steps x 3 parameters. Squares that overflow float32 (1e25, 1e38) are non-finite, not outliers.
    expected_skips = 9 if scale >= 1e3 else 0
    assert int(optimizer.skipped_updates) == expected_skips
    assert int(optimizer.outlier_updates) == (9 if scale in (1e3, 1e15) else 0)
    assert int(optimizer.preconditioner_failures) == 0


def test_huge_gradient_without_the_bound_still_keeps_state_finite():
    """`gradient_norm_bound=None`: only non-finite norms are skipped; statistics overflow is discarded."""
    variables = make_variables()
    optimizer = Shampoo(gradient_norm_bound=None, start_preconditioning_step=1, preconditioning_compute_steps=1)
    rng = np.random.default_rng(2)
    for step in range(4):
        optimizer.apply(random_gradients(rng, 1e17 if step % 2 else 1.0), variables)
    assert int(optimizer.skipped_updates) == 0 and int(optimizer.outlier_updates) == 0
    assert_all_finite(variables)
    assert_all_finite(optimizer.variables)


def test_gradient_guard_adapts_to_a_lasting_change_of_scale():
    """A spike is skipped; a scale that stays 1,000x larger is accepted again after a few steps."""
    variables = make_variables()
    optimizer = Shampoo(start_preconditioning_step=1, preconditioning_compute_steps=1)
    rng = np.random.default_rng(5)
    for _ in range(20):
        optimizer.apply(random_gradients(rng), variables)
    skipped = []
    for _ in range(12):
        before = int(optimizer.skipped_updates)
        optimizer.apply(random_gradients(rng, 1e3), variables)
        skipped.append(int(optimizer.skipped_updates) - before)
    # The running norm r grows by at most 0.99 + 0.01 * 100 = 1.99x per skipped step: log(10) / log(1.99)
    # ~ 3.3, so the 1,000x scale (10x above the bound) is skipped 3-4 times, then accepted.
    assert skipped[0] == 3 and 3 <= sum(s > 0 for s in skipped) <= 5 and skipped[-1] == 0
    assert_all_finite(optimizer.variables)


def test_failed_roots_are_counted_and_previous_roots_kept():
    variables = make_variables()
    rng = np.random.default_rng(3)
    # A Newton error threshold no root can meet: every root computation fails.
    optimizer = Shampoo(
        root_method="newton",
        root_error_threshold=1e-30,
        diagonal_rank1=False,
        start_preconditioning_step=1,
        preconditioning_compute_steps=1,
    )
    for _ in range(3):
        optimizer.apply(random_gradients(rng), variables)
    assert_all_finite(variables)
    # Every factor's root fails on each of the 3 steps: (4, 3) has 2 factors, (3,) 1, (2, 3, 2) 3.
    assert int(optimizer.preconditioner_failures) == 3 * 6
    for root in optimizer._roots[0]:
        np.testing.assert_array_equal(root.numpy(), np.eye(root.shape[-1])[None])


# ---------------------------------------------------------------------------------------------
# Sparse (embedding) gradients give the same step as their dense equivalent.
# ---------------------------------------------------------------------------------------------
def test_indexed_slices_match_dense_gradients():
    rng = np.random.default_rng(4)
    table = rng.normal(size=(10, 3)).astype("float32")
    indices = tf.constant([1, 4, 1, 7, 4, 4])  # repeated rows
    optimizers, variables = [], []
    for _ in range(2):
        variables.append(keras.Variable(table))
        optimizers.append(
            Shampoo(
                diagonal_threshold=5, start_preconditioning_step=1, preconditioning_compute_steps=2, grafting="rmsprop"
            )
        )
    for _ in range(3):
        values = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
        sparse = tf.IndexedSlices(values, indices, dense_shape=tf.constant([10, 3]))
        optimizers[0].apply([sparse], [variables[0]])
        optimizers[1].apply([tf.convert_to_tensor(sparse)], [variables[1]])
    np.testing.assert_allclose(variables[0].numpy(), variables[1].numpy(), rtol=1e-6, atol=1e-7)
    for a, b in zip(optimizers[0].variables, optimizers[1].variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Distribution, checkpoints, serialization, XLA.
# ---------------------------------------------------------------------------------------------
DISTRIBUTED = dict(
    learning_rate=0.01,
    start_preconditioning_step=2,
    preconditioning_compute_steps=2,
    diagonal_threshold=10,
    momentum=0.5,
    # Exact roots: a basis stored from rank-deficient early factors is not unique, and rounding
    # differences between one device and two replicas would pick different ones.
    eigenbasis_compute_steps=None,
)


def assert_same_training(actual, expected, initial, tolerance):
    """Weights agree relative to how far training moved them."""
    for a, e, p0 in zip(actual, expected, initial, strict=True):
        assert np.linalg.norm(a - e) <= tolerance * np.linalg.norm(e - p0)


def test_mirrored_strategy_matches_one_device_and_replicas_agree():
    # float64, so that the two ways of summing the batch (one device; two half-batches all-reduced)
    # differ only by float64 rounding, which Shampoo's roots would amplify past float32 tolerances.
    initial = small_model(dtype="float64").get_weights()
    expected = fit(Shampoo(**DISTRIBUTED), model=small_model(dtype="float64"))
    # ReductionToOneDevice: CPU collectives keep instance keys per process, and another test's float32
    # MirroredStrategy run in the same pytest process would collide with this float64 one.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        model = small_model(dtype="float64")
        optimizer = Shampoo(**DISTRIBUTED)
    fit(optimizer, model=model, run_eagerly=False)  # a tf.function, as model.fit runs by default
    assert_same_training(model.get_weights(), expected.get_weights(), initial, 1e-9)
    assert optimizer.iterations.numpy() == expected.optimizer.iterations.numpy() == 8
    # Every replica holds the same statistics, roots and counters.
    for variable in optimizer.variables:
        replicas = [value.numpy() for value in variable.value.values]
        assert len(replicas) == 2
        np.testing.assert_array_equal(replicas[0], replicas[1])
    for a, e in zip(optimizer.variables, expected.optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-7, atol=1e-9)


def test_checkpoint_resume_continues_identically(tmp_path):
    config = dict(learning_rate=0.01, start_preconditioning_step=3, preconditioning_compute_steps=5, momentum=0.9)
    uninterrupted = fit(Shampoo(**config), epochs=3)
    first = fit(Shampoo(**config), epochs=1)
    path = str(tmp_path / "model.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed.optimizer, Shampoo)
    assert int(resumed.optimizer.iterations) == 4
    for a, e in zip(resumed.optimizer.variables, first.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), e.numpy())
    features, targets = small_data()
    resumed.fit(features, targets, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, e in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_tf_train_checkpoint_restores_optimizer_state(tmp_path):
    model = fit(Shampoo(start_preconditioning_step=2, preconditioning_compute_steps=3), epochs=1)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    saved = [v.numpy() for v in model.optimizer.variables]
    fit(model.optimizer, epochs=1, model=model)  # move the state on
    checkpoint.restore(path).assert_consumed()
    for a, e in zip(model.optimizer.variables, saved, strict=True):
        np.testing.assert_array_equal(a.numpy(), e)


def test_get_config_round_trip():
    optimizer = Shampoo(
        learning_rate=schedule(),
        beta2=0.99,
        momentum=0.9,
        nesterov=True,
        grafting="rmsprop",
        exponent_override={"kernel": 4},
        block_size=128,
        eigenbasis_method="qr",
        weight_decay=1e-4,
        clipnorm=1.0,
    )
    config = optimizer.get_config()
    assert config["eigenbasis_method"] == "qr"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, Shampoo)
    restored_config = restored.get_config()
    for key, value in config.items():
        if key != "learning_rate":
            assert restored_config[key] == value, key
    assert restored_config["learning_rate"]["config"] == config["learning_rate"]["config"]


# XLA's eigh alone is checked in test_matrix_functions; inside the optimizer it compiles slowly.
@pytest.mark.parametrize("root_method", [pytest.param("eigh", marks=pytest.mark.slow), "newton"])
def test_jit_compiled_steps_match_numpy_transcription(root_method):
    data, init = regression_problem()
    config = dict(CONFIGURATIONS["rmsprop_momentum_rank1_diagonal"], root_method=root_method)
    actual, optimizer = run_shampoo(init, data, 4, "float64", jit_compile=True, **config)
    del config["root_method"]
    expected = run_reference(init, data, 4, **config)
    # XLA's eigh is a Jacobi iteration with a 1e-5-ish tolerance; Newton stops at 1e-6.
    assert_trajectories_match(actual, expected, init, 1e-4)
    assert int(optimizer.preconditioner_failures) == 0


@pytest.mark.slow
@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_model_fit_with_jit_compile_matches_graph_mode(root_method):
    # float64: XLA's float32 kernels (tanh, fused reductions) round differently from TensorFlow's.
    config = dict(DISTRIBUTED, root_method=root_method)
    initial = small_model(dtype="float64").get_weights()
    expected = fit(Shampoo(**config), model=small_model(dtype="float64")).get_weights()
    model = fit(Shampoo(**config), model=small_model(dtype="float64"), jit_compile=True)
    assert int(model.optimizer.preconditioner_failures) == 0
    # XLA's eigh is a Jacobi iteration with a loose (about 1e-5) tolerance, even in float64.
    assert_same_training(model.get_weights(), expected, initial, 1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grafting="foo"), "`grafting` should be one of"),
        (dict(batch_roots="yes"), "`batch_roots` should be True, False or 'auto'"),
        (dict(beta2=0.0), "`beta2`"),
        (dict(beta2=1.5), "`beta2`"),
        (dict(momentum=1.0), "`momentum`"),
        (dict(epsilon=-1.0), "`epsilon`"),
        (dict(start_preconditioning_step=0), "`start_preconditioning_step`"),
        (dict(preconditioning_compute_steps=2.5), "`preconditioning_compute_steps`"),
        (dict(statistics_compute_steps=0), "`statistics_compute_steps`"),
        (dict(block_size=0), "`block_size`"),
        (dict(root_method="svd"), "`root_method`"),
        (dict(eigenbasis_compute_steps=15, preconditioning_compute_steps=10), "`eigenbasis_compute_steps`"),
        (dict(eigenbasis_compute_steps=20, root_method="newton"), "`eigenbasis_compute_steps`"),
        (dict(eigenbasis_method="svd"), "`eigenbasis_method` should be one of"),
        (dict(eigenbasis_method="qr", eigenbasis_compute_steps=None), "`eigenbasis_method='qr'` refreshes"),
        (dict(eigenbasis_method="qr", preconditioner="soap"), "`eigenbasis_method='qr'` refreshes"),
        (dict(exponent_override=-1), "`exponent_override`"),
        (dict(exponent_override={"kernel": -2}), "exponent_override"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Shampoo(**kwargs)
    assert "Received" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The pure pieces: block partitioning and grafting norms.
# ---------------------------------------------------------------------------------------------
def test_layout_blocks_and_diagonal_dimensions():
    layout = partition.plan_layout((9066, 2500), block_size=1024, diagonal_threshold=4096)
    assert layout.diagonal == (True, False)
    assert layout.splits == ((9066,), (1024, 1024, 452))
    assert layout.block_shapes == [(9066, 1024), (9066, 1024), (9066, 452)]
    assert partition.plan_layout((), 8, 8).shape == (1,)
    assert partition.plan_layout((5,), 8, 8, diagonal_rank1=True).diagonal == (True,)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 5, 6), (3, 1, 4, 2)])
@pytest.mark.parametrize("block_size", [1, 2, 3, 100])
def test_split_and_merge_blocks_round_trip(shape, block_size):
    layout = partition.plan_layout(shape, block_size=block_size, diagonal_threshold=4)
    tensor = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    blocks = partition.split_blocks(tf.constant(tensor), layout)
    assert [tuple(b.shape) for b in blocks] == layout.block_shapes
    # Row-major block order: block i holds the slice given by the i-th product of block ranges.
    ranges = [np.cumsum((0,) + sizes) for sizes in layout.splits]
    for block, corner in zip(blocks, itertools.product(*[r[:-1] for r in ranges]), strict=True):
        slices = tuple(slice(c, c + s) for c, s in zip(corner, block.shape, strict=True))
        np.testing.assert_array_equal(block.numpy(), tensor[slices])
    np.testing.assert_array_equal(partition.merge_blocks(blocks, layout).numpy(), tensor)


def test_graft_norm_takes_the_grafted_norm_and_flags_overflow():
    preconditioned, direction = np.array([1.0, 2.0, 2.0]), np.array([0.0, 3.0, 4.0])
    grafted = grafting_lib.graft_norm(tf.constant(preconditioned), tf.constant(direction))
    np.testing.assert_allclose(grafted.update.numpy(), preconditioned * 5.0 / 3.0, rtol=1e-12)
    assert bool(grafted.finite)
    zero = grafting_lib.graft_norm(tf.zeros(3), tf.ones(3))
    assert np.all(zero.update.numpy() == 0.0) and bool(zero.finite)
    # Squares above float32's range: the norm overflows, and the caller is told not to use it.
    overflow = grafting_lib.graft_norm(tf.constant([1e30, 0.0]), tf.constant([3.0, 4.0]))
    assert not bool(overflow.finite)
    assert not bool(grafting_lib.graft_norm(tf.constant([np.nan, 1.0]), tf.constant([3.0, 4.0])).finite)


def test_docstring_example_runs():
    source = Shampoo.__doc__.split("```python")[1].split("```")[0]
    lines = [line[4:] if line.startswith("    ") else line for line in source.splitlines()]
    namespace = {}
    exec("\n".join(lines), namespace)
    assert int(namespace["model"].optimizer.preconditioner_failures) == 0


def test_eigenbasis_reuse_differs_from_exact_roots_between_decompositions():
    # The stored-basis roots are an approximation: the trajectory must leave the exact one on the
    # steps between decompositions (so the transcription test above could fail), but stay close.
    data, init = regression_problem()
    config = CONFIGURATIONS["adam_eigenbasis_reuse"]
    exact = {k: v for k, v in config.items() if k != "eigenbasis_compute_steps"}
    reused, _ = run_shampoo(init, data, 5, "float64", **config)
    reference = run_reference(init, data, 5, **exact)
    step3 = max(np.abs(a - e).max() for a, e in zip(reused[2], reference[2], strict=True))
    step5 = max(np.abs(a - e).max() for a, e in zip(reused[4], reference[4], strict=True))
    assert step3 < 1e-12
    assert 1e-8 < step5 < 0.05


def test_root_in_basis_is_exact_in_the_eigenbasis_and_checked():
    rng = np.random.default_rng(0)
    vectors = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    matrix = (vectors * np.array([1e-3, 0.1, 1.0, 2.0, 5.0, 9.0])) @ vectors.T
    exact = inverse_root(matrix, 4, 1e-6, relative=False)
    result = matrix_functions.matrix_inverse_root(
        tf.constant(matrix), 4, 1e-6, method="basis", eigenvectors=tf.constant(vectors), return_eigenvectors=True
    )
    np.testing.assert_allclose(result.root.numpy(), exact, rtol=1e-9, atol=1e-12)
    assert bool(result.ok) and result.eigenvectors is not None
    with pytest.raises(ValueError, match="eigenvectors"):
        matrix_functions.matrix_inverse_root(tf.constant(matrix), 4, method="basis")


def _left_factor_history(steps, **config):
    """Shampoo on one 6x4 matrix in float64; per step, the left factor's statistics, basis and root."""
    rng = np.random.default_rng(11)
    variable = keras.Variable(rng.normal(size=(6, 4)), dtype="float64", name="W")
    optimizer = Shampoo(
        start_preconditioning_step=1, preconditioning_compute_steps=1, statistics_compute_steps=1,
        eigenbasis_compute_steps=2, epsilon=1e-6, relative_epsilon=False, block_size=64, **config,
    )
    optimizer.build([variable])
    left = [position for position, group in enumerate(optimizer._factor_groups[0]) if group.size == 6][0]
    history = []
    for _ in range(steps):
        optimizer.apply([tf.constant(rng.normal(size=(6, 4)))], [variable])
        history.append(tuple(store[0][left].value.numpy()[0] for store in (
            optimizer._statistics, optimizer._eigenvectors, optimizer._roots)))
    return history


def test_qr_eigenbasis_refresh_follows_its_contract():
    """Step 1: a full eigendecomposition; steps 3 and 5 (basis steps): Q <- QR(F Q); steps 2 and 4: the
    roots in the stored basis. Checked against numpy at every step."""
    history = _left_factor_history(5, eigenbasis_method="qr")
    statistics, basis, root = history[0]
    np.testing.assert_allclose(root, inverse_root(statistics, 4, 1e-6, relative=False), rtol=1e-8, atol=1e-10)
    for step in range(2, 6):
        statistics, basis, root = history[step - 1]
        previous_basis = history[step - 2][1]
        if step % 2:  # a refresh by orthogonal iteration from the stored basis
            expected = np.linalg.qr(statistics @ previous_basis)[0]
            np.testing.assert_allclose(np.abs(np.sum(basis * expected, axis=0)), 1.0, rtol=1e-8)
        else:
            np.testing.assert_array_equal(basis, previous_basis)
        np.testing.assert_allclose(
            root, inverse_root_in_basis(statistics, basis, 4, 1e-6, relative=False), rtol=1e-8, atol=1e-10
        )
    # ... which is not what a full eigendecomposition gives on the refresh steps.
    eigh_root = _left_factor_history(3, eigenbasis_method="eigh")[2][2]
    assert not np.allclose(history[2][2], eigh_root, rtol=1e-6)
    np.testing.assert_allclose(eigh_root, inverse_root(history[2][0], 4, 1e-6, relative=False), rtol=1e-8)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_eigenbasis_method_auto_is_qr_under_xla_only(jit_compile, monkeypatch):
    methods = set()
    original = matrix_functions.matrix_inverse_root

    def recording(matrix, *args, **kwargs):
        methods.add(kwargs.get("method", "eigh"))
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(matrix_functions, "matrix_inverse_root", recording)
    variable = keras.Variable(np.ones((6, 4), "float32"), name="W")
    optimizer = Shampoo(start_preconditioning_step=1, block_size=64)
    assert optimizer.eigenbasis_method == "auto" and optimizer.eigenbasis_compute_steps == 100
    optimizer.build([variable])
    step = tf.function(lambda gradient: optimizer.apply([gradient], [variable]), jit_compile=jit_compile)
    step(tf.ones((6, 4)))
    assert methods == ({"eigh", "qr", "basis"} if jit_compile else {"eigh", "basis"})


# ---------------------------------------------------------------------------------------------
# Embedding tables: the grafted method by default, or a diagonal vocabulary factor.
# ---------------------------------------------------------------------------------------------
def embedding_problem(embedding_tables):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((), dtype="int32"), keras.layers.Embedding(50, 4, name="embedding"),
                              keras.layers.Dense(1, name="dense")])
    optimizer = keras.optimizers.Adam(0.01) if embedding_tables is None else Shampoo(
        0.01, embedding_tables=embedding_tables, start_preconditioning_step=1, preconditioning_compute_steps=1
    )
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, 256), rng.normal(size=(256, 1)).astype("float32")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model, optimizer


@pytest.mark.parametrize("embedding_tables", ["grafted", "diagonal", "shampoo"])
def test_embedding_tables_setting_decides_the_tables_factors(embedding_tables):
    model, optimizer = embedding_problem(embedding_tables)
    table = [i for i, v in enumerate(model.trainable_variables) if "embedding" in v.path][0]
    index = optimizer._get_variable_index(model.trainable_variables[table])
    layout, statistics = optimizer._layouts[index], optimizer._statistics[index]
    if embedding_tables == "grafted":
        assert statistics == [] and optimizer._root_orders[index] == 0
    elif embedding_tables == "diagonal":  # 50 rows < diagonal_threshold, diagonal anyway
        assert layout.diagonal == (True, False) and [tuple(s.shape) for s in statistics] == [(1, 50), (1, 4, 4)]
    else:
        assert layout.diagonal == (False, False) and [tuple(s.shape) for s in statistics] == [(1, 50, 50), (1, 4, 4)]
    assert_all_finite(optimizer.variables)


@pytest.mark.parametrize("jit_compile", [None, False, True])
def test_grafted_tables_take_adams_dense_step(jit_compile):
    """With tables on the grafted method, a table whose every row is touched moves as under Keras Adam
    applied to the dense gradient: eagerly, in a graph and under XLA (the fused Adam kernel's path), and
    for a sparse gradient too (Shampoo's is made dense first)."""
    rng = np.random.default_rng(1)
    table = keras.Variable(rng.normal(size=(6, 3)).astype("float32"), name="embeddings")
    reference = keras.Variable(table.numpy(), name="reference")
    shampoo = Shampoo(0.01, start_preconditioning_step=1, preconditioning_compute_steps=1)
    adam = keras.optimizers.Adam(0.01)
    shampoo.build([table])
    assert shampoo._root_orders[0] == 0 and shampoo._fuses_adam(table)

    def step(gradient):
        shampoo.apply([gradient], [table])

    if jit_compile is not None:
        step = tf.function(step, jit_compile=jit_compile)
    for index in range(4):
        dense = rng.normal(size=(6, 3)).astype("float32")
        if index % 2:  # every row touched, one twice
            rows = np.array([0, 1, 2, 3, 4, 5, 2])
            values = np.concatenate([dense, np.zeros((1, 3), "float32")])
            step(tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([6, 3])))
        else:
            step(tf.constant(dense))
        adam.apply([tf.constant(dense)], [reference])
    assert "embedding" in table.path.lower()
    np.testing.assert_allclose(table.numpy(), reference.numpy(), rtol=2e-5, atol=1e-6)


def test_half_precision_table_keeps_the_unfused_grafted_step():
    """A float16 table's moments are float16 slots while its step is computed in float32: not fused."""
    rng = np.random.default_rng(2)
    table = keras.Variable(rng.normal(size=(5, 2)).astype("float16"), name="embeddings", dtype="float16")
    shampoo = Shampoo(0.01, start_preconditioning_step=1)
    shampoo.build([table])
    assert not shampoo._fuses_adam(table)
    before = table.numpy().astype("float32")
    shampoo.apply([tf.constant(np.ones((5, 2), "float16"))], [table])
    # Adam's first step moves every entry by the learning rate, against the gradient's sign.
    np.testing.assert_allclose(before - table.numpy().astype("float32"), 0.01, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Batched roots across parameters (issue #20) and roots shared out between replicas (issue #19).
# ---------------------------------------------------------------------------------------------
BATCHED_SHAPES = {"W1": (6, 4), "W2": (4, 4), "b": (4,), "T": (4, 3, 2), "U": (3, 4, 2)}


def run_batched_problem(batch_roots, steps=6, dtype="float64", jit_compile=None, **config):
    """Shampoo on parameters whose factors share sizes across parameters; returns (variables, optimizer)."""
    rng = np.random.default_rng(7)
    variables = [
        keras.Variable(rng.normal(size=shape) * 0.5, dtype=dtype, name=name) for name, shape in BATCHED_SHAPES.items()
    ]
    targets = [tf.constant(rng.normal(size=shape), dtype) for shape in BATCHED_SHAPES.values()]
    optimizer = Shampoo(batch_roots=batch_roots, **config)
    optimizer.build(variables)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(tf.square(tf.tanh(v) - t)) for v, t in zip(variables, targets, strict=True)])
        optimizer.apply(tape.gradient(loss, variables), variables)

    train_step = step if jit_compile is None else tf.function(step, jit_compile=jit_compile)
    for _ in range(steps):
        train_step()
    return variables, optimizer


BATCHED_CONFIGURATIONS = {
    "exact_eigh": dict(
        learning_rate=0.05, start_preconditioning_step=2, preconditioning_compute_steps=2, statistics_compute_steps=1,
        eigenbasis_compute_steps=None, momentum=0.5,
    ),
    "stored_basis": dict(
        learning_rate=0.05, start_preconditioning_step=2, preconditioning_compute_steps=1, statistics_compute_steps=1,
        eigenbasis_compute_steps=3, grafting="rmsprop",
    ),
    "newton_blocks": dict(
        learning_rate=0.05, start_preconditioning_step=1, preconditioning_compute_steps=2, statistics_compute_steps=2,
        root_method="newton", block_size=3, relative_epsilon=False, epsilon=1e-2,
    ),
}


def test_root_plan_batches_equal_sized_factors_across_parameters():
    _, optimizer = run_batched_problem(True, steps=0, **BATCHED_CONFIGURATIONS["exact_eigh"])
    plan = {(batch.size, batch.order): batch for batch in optimizer._root_plan}
    # W1 (6, 4) and W2 (4, 4): the three 4 x 4 factors of order 4 form one batch; T and U (rank 3,
    # order 6) share their 4-, 3- and 2-factors. The bias is diagonal (no full factor).
    assert set(plan) == {(6, 4), (4, 4), (4, 6), (3, 6), (2, 6)}
    assert plan[(4, 4)].members == ((0, 1, 1), (1, 0, 2))  # W1's 4-group, W2's (two factors)
    assert plan[(4, 4)].count == 3
    assert [index for index, *_ in plan[(3, 6)].members] == [3, 4]


# The trajectory tests above check the batched path (the default) against numpy in every configuration.
@pytest.mark.parametrize(
    "name", ["exact_eigh", pytest.param("stored_basis", marks=pytest.mark.slow),
             pytest.param("newton_blocks", marks=pytest.mark.slow)],
)
def test_batched_roots_equal_per_parameter_roots(name):
    config = BATCHED_CONFIGURATIONS[name]
    batched, batched_optimizer = run_batched_problem(True, steps=5, **config)
    separate, separate_optimizer = run_batched_problem(False, steps=5, **config)
    for a, b in zip(batched, separate, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    for a, b in zip(batched_optimizer.variables, separate_optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11, err_msg=a.path)
    assert batched_optimizer.fault_counts() == separate_optimizer.fault_counts()
    assert int(batched_optimizer.preconditioner_failures) == 0


def test_batched_roots_are_the_numpy_inverse_roots_of_the_statistics():
    # Statistics and roots on every step, so the roots held after the last step are those of the
    # statistics held then: each factor's (F + eps lambda_max I)^(-1/p), p = 2 * rank.
    config = dict(BATCHED_CONFIGURATIONS["exact_eigh"], preconditioning_compute_steps=1)
    variables, optimizer = run_batched_problem(True, steps=4, dtype="float32", **config)
    checked = 0
    for index, variable in enumerate(variables):
        for group, statistics, roots in zip(
            optimizer._factor_groups[index], optimizer._statistics[index], optimizer._roots[index], strict=True
        ):
            for factor, root in zip(statistics.numpy(), roots.numpy(), strict=True):
                if group.diagonal:
                    expected = diagonal_inverse_root(factor.astype("float64"), 2 * len(variable.shape), 1e-6, True)
                else:
                    expected = inverse_root(factor.astype("float64"), 2 * len(variable.shape), 1e-6, True)
                    checked += 1
                scale = np.abs(expected).max()
                np.testing.assert_allclose(root, expected, rtol=0, atol=2e-4 * scale)
    assert checked == 10  # W1: 6, 4; W2: 4, 4; T: 4, 3, 2; U: 3, 4, 2 (the bias's factor is diagonal)


def test_root_owners_deal_equal_sizes_round_robin_and_balance_cost():
    from matta_tf.optimizers.shampoo import assign_root_owners

    assert assign_root_owners([8, 8, 8, 8, 8], 2) == [0, 1, 0, 1, 0]
    assert assign_root_owners([4, 4], 1) == [0, 0]
    # Largest first, each to the least-loaded replica: 256^3 outweighs four 128^3 and a 64^3.
    assert assign_root_owners([128, 128, 256, 128, 64, 128], 2) == [1, 1, 0, 1, 1, 1]
    sizes = [128] * 7 + [64] * 5 + [96, 200]
    owners = assign_root_owners(sizes, 3)
    loads = [sum(s**3 for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes) ** 3  # the greedy bound


def test_mirrored_replicas_share_out_the_roots(monkeypatch):
    """Each factor's root is computed on one replica's device only, and the training equals one device's."""
    calls = []
    original = matrix_functions.matrix_inverse_root

    def recording(matrix, *args, **kwargs):
        result = original(matrix, *args, **kwargs)
        calls.append((result.root.device, int(matrix.shape[0])))
        return result

    monkeypatch.setattr(matrix_functions, "matrix_inverse_root", recording)
    initial = small_model(dtype="float64").get_weights()
    expected = fit(Shampoo(**DISTRIBUTED), model=small_model(dtype="float64"))
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        model = small_model(dtype="float64")
        optimizer = Shampoo(**DISTRIBUTED)
    calls.clear()
    fit(optimizer, model=model, run_eagerly=False)
    assert_same_training(model.get_weights(), expected.get_weights(), initial, 1e-9)
    # Full factors: Dense(10 -> 8) has a 10 and an 8, Dense(8 -> 1) an 8 and a 1 (the table is
    # grafted, biases diagonal); the two 8s form one batch.
    factors = sum(batch.count for batch in optimizer._root_plan)
    assert factors == 4 and len(optimizer._root_plan) == 3
    per_device = {}
    for device, count in calls:
        key = "cpu:1" if device.lower().endswith("cpu:1") else "cpu:0"
        per_device[key] = per_device.get(key, 0) + count
    traces = sum(per_device.values()) // factors
    assert traces >= 1 and sum(per_device.values()) == traces * factors  # each factor rooted once a trace
    assert per_device["cpu:0"] > 0 and per_device["cpu:1"] > 0  # ... by either replica
    for variable in optimizer.variables:
        replicas = [value.numpy() for value in variable.value.values]
        np.testing.assert_array_equal(replicas[0], replicas[1])
    for a, e in zip(optimizer.variables, expected.optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-7, atol=1e-9)


def test_keras_update_step_internal_is_as_shampoo_overrides_it():
    """Canary: Shampoo's batched step overrides this private method of Keras's TensorFlow optimizer."""
    import inspect

    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    assert list(inspect.signature(TFOptimizer._distributed_tf_update_step).parameters) == [
        "self", "distribution", "grads_and_vars", "learning_rate",
    ]
    source = inspect.getsource(TFOptimizer._backend_update_step)
    assert "_distributed_tf_update_step" in source and "maybe_merge_call" in source


def make_sine_step(variable, optimizer):
    def step():
        optimizer.apply([tf.sin(variable.value)], [variable])

    return step


def test_batch_roots_auto_batches_except_under_xla(monkeypatch):
    from matta_tf.optimizers.shampoo import Shampoo as ShampooClass

    calls = []
    original = ShampooClass._batched_roots

    def recording(self, distribution):
        calls.append(self.name)
        return original(self, distribution)

    monkeypatch.setattr(ShampooClass, "_batched_roots", recording)
    config = dict(learning_rate=0.1, start_preconditioning_step=1, preconditioning_compute_steps=1,
                  root_method="newton", eigenbasis_compute_steps=None, epsilon=0.1, relative_epsilon=False)
    results = {}
    for name, jit_compile, batch_roots in [("eager_auto", None, "auto"), ("xla_auto", True, "auto"),
                                           ("xla_true", True, True)]:
        calls.clear()
        variable = keras.Variable(np.arange(12.0).reshape(4, 3) / 10, dtype="float32")
        optimizer = Shampoo(batch_roots=batch_roots, **config)
        optimizer.build([variable])

        step = make_sine_step(variable, optimizer)
        step = step if jit_compile is None else tf.function(step, jit_compile=True)
        for _ in range(2):
            step()
        results[name] = (bool(calls), variable.numpy())
    assert results["eager_auto"][0] and not results["xla_auto"][0] and results["xla_true"][0]
    # Well-conditioned factors (absolute damping 0.1), so XLA's float32 rounding stays small.
    np.testing.assert_allclose(results["xla_auto"][1], results["eager_auto"][1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(results["xla_true"][1], results["xla_auto"][1], rtol=1e-4, atol=1e-6)
