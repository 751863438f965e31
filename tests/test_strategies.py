"""Training strategies (`FixedMatTA`, `Sandwich`) and per-group learning rates of `MatTAModel`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from test_relevance import CONFIG, SCHEMA, _raw_batch

from matta_tf.data.preprocessing import FeaturePreprocessor, preprocessed_name
from matta_tf.extraction import SubmodelSpec, extract_submodel, is_extractable, random_specs
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.models.relevance import build_relevance_network
from matta_tf.training import FixedMatTA, IndependentStudentTA, InPlaceSubmodel, MatTAModel, Sandwich, losses
from matta_tf.training.strategies import used_elements

FEATURES = 6


def dense_network(activation: str | None = "tanh", seed: int = 0) -> keras.Model:
    """6 -> hidden_0 (4 | 8) -> hidden_1 (3 | 6) -> logit (1): two choosable layers, two mixed specs."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    x = NestedDense(4, 8, activation=activation, bias_initializer="random_normal", name="hidden_0")(inputs)
    x = NestedDense(3, 6, activation=activation, bias_initializer="random_normal", name="hidden_1")(x)
    return keras.Model(inputs, list(NestedDense(1, 1, name="logit")(x)), name="dense")


def binary_data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=FEATURES) > 0).astype("int64")
    return x, y


# Elements each sub-model reads, by hand from NestedDense's layout (kernel (M_TA, N_TA), bias (N_TA,)).
def blocks(h0: tuple, h1: tuple, logit_rows: int) -> dict:
    """`{variable path: mask}` for hidden_0 kernel[:, :h0[1]], hidden_1 kernel[:h1[0], :h1[1]], logit rows."""
    masks = {}
    for name, shape, (rows, cols) in (("hidden_0", (6, 8), h0), ("hidden_1", (8, 6), h1),
                                      ("logit", (6, 1), (logit_rows, 1))):
        kernel = np.zeros(shape, bool)
        kernel[:rows, :cols] = True
        bias = np.zeros(shape[1], bool)
        bias[:cols] = True
        masks[f"{name}/kernel"], masks[f"{name}/bias"] = kernel, bias
    return masks


STUDENT = blocks((6, 4), (4, 3), 3)
MIXED = {("student", "ta"): blocks((6, 4), (4, 6), 6), ("ta", "student"): blocks((6, 8), (8, 3), 3)}


def choices(spec: SubmodelSpec) -> tuple:
    return spec.choices["hidden_0"], spec.choices["hidden_1"]


def relevance_features(n: int = 32, seed: int = 0) -> dict:
    return FeaturePreprocessor(SCHEMA)(_raw_batch(n, seed))


# ---- the pool -------------------------------------------------------------------------------------------
def test_the_pool_holds_distinct_extractable_mixed_specs_drawn_with_the_seed():
    keras.utils.set_random_seed(0)
    network = build_relevance_network(SCHEMA, CONFIG)
    strategy = Sandwich(k=2, pool_size=3, seed=5)
    strategy.bind(network, "matta")
    pool = strategy.pool
    assert len(pool) == 3 and len({tuple(sorted(s.choices.items())) for s in pool}) == 3
    for spec in pool:
        assert is_extractable(network, spec)
        assert set(spec.choices.values()) == {"student", "ta"}  # mixed: neither the Student nor the TA
    again = random_specs(network, 3, seed=5, include_ends=False, mixed_only=True)
    assert [s.choices for s in again] == [s.choices for s in pool]
    other = random_specs(network, 3, seed=6, include_ends=False, mixed_only=True)
    assert [s.choices for s in other] != [s.choices for s in pool]
    # random_specs(mixed_only=True) never draws an end, even when asked for every spec there is.
    drawn = random_specs(dense_network(), 10, include_ends=False, mixed_only=True)
    assert sorted(choices(s) for s in drawn) == sorted(MIXED)


def test_a_spec_that_cannot_run_in_place_is_refused_by_name():
    network = dense_network()
    with pytest.raises(ValueError, match="is the Student or the TA"):
        Sandwich(specs=[SubmodelSpec.uniform(network, "ta")]).bind(network, "matta")
    with pytest.raises(ValueError, match="mode='matta'"):
        MatTAModel(network, mode="student_only", training_strategy=Sandwich())
    student = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    ta = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="built functional model"):
        MatTAModel(IndependentStudentTA(student, ta), training_strategy=Sandwich())
    for kwargs, name in (({"k": 0}, "k"), ({"pool_size": 1.5}, "pool_size"), ({"loss_weight": -1.0}, "loss_weight"),
                         ({"label_weight": float("nan")}, "label_weight")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            Sandwich(**kwargs)
    with pytest.raises(ValueError, match="training_strategy"):
        MatTAModel(network, training_strategy="slimmable")


# ---- the in-place forward pass ------------------------------------------------------------------------
def test_a_spec_runs_in_place_as_its_extracted_submodel_and_leaves_the_weights_untouched():
    keras.utils.set_random_seed(1)
    config = CONFIG.__class__(**{**CONFIG.__dict__, "ta_only_blocks": 1})
    network = build_relevance_network(SCHEMA, config)
    weights = [w.copy() for w in network.get_weights()]
    specs = random_specs(network, 3, seed=2, include_ends=False, mixed_only=True)
    features = relevance_features()
    for spec in specs:
        in_place = InPlaceSubmodel(network, spec)
        np.testing.assert_allclose(ops.convert_to_numpy(in_place(features)),
                                   ops.convert_to_numpy(extract_submodel(network, spec)(features)), atol=1e-5)
    for before, after in zip(weights, network.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    # The in-place pass reads the nested variables: moving them moves its output, unlike a copy's.
    in_place = InPlaceSubmodel(network, specs[0])
    before = ops.convert_to_numpy(in_place(features))
    network.get_layer("logits").bias.assign([1.5])
    np.testing.assert_allclose(ops.convert_to_numpy(in_place(features)), before + 1.5, atol=1e-5)


def test_used_elements_are_the_blocks_each_spec_reads():
    network = dense_network()
    paths = [v.path for v in network.variables]
    for spec_choices, expected in [(("student", "student"), STUDENT), *MIXED.items()]:
        spec = SubmodelSpec(dict(zip(("hidden_0", "hidden_1"), spec_choices, strict=True)))
        for path, mask in zip(paths, used_elements(network, spec), strict=True):
            np.testing.assert_array_equal(mask, expected[path], err_msg=f"{spec_choices} {path}")


# ---- gradients ----------------------------------------------------------------------------------------
def step_gradients(model: MatTAModel, x, y) -> dict:
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True), training=True)
    variables = model.network.trainable_variables
    return {v.path: ops.convert_to_numpy(g) for v, g in zip(variables, tape.gradient(loss, variables), strict=True)}


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_gradients_reach_exactly_the_student_and_the_sampled_spec(step):
    # Only the distillation terms (w_S = w_TA = 0): the TA is a detached target, so every gradient
    # comes from the Student's pass and the sampled spec's, and must be exactly zero elsewhere.
    x, y = binary_data()
    model = MatTAModel(dense_network(), loss_weights=(0.0, 0.0, 1.0), training_strategy=Sandwich(k=1, seed=3))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.optimizer.iterations.assign(step)
    strategy = model.training_strategy
    sampled = strategy.pool[int(strategy.sampled(step)[0])]
    expected = {path: STUDENT[path] | MIXED[choices(sampled)][path] for path in STUDENT}
    gradients = step_gradients(model, x, y)
    for path, gradient in gradients.items():
        np.testing.assert_array_equal(gradient != 0, expected[path], err_msg=f"{choices(sampled)} {path}")
    # Over a few steps both mixed specs are drawn.
    assert {int(strategy.sampled(s)[0]) for s in range(8)} == {0, 1}


def test_in_place_distillation_sends_no_gradient_into_the_ta():
    x, y = binary_data()
    model = MatTAModel(dense_network(), training_strategy=Sandwich(k=2))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    outputs = model(x, training=True)
    targets = model.targets(y)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(outputs["ta"])
        terms = model.training_strategy.extra_losses(model, x, targets, outputs["ta"], training=True)
        weight, per_example = terms["sandwich"]
        spec_loss = weight * tf.reduce_mean(per_example)
    assert tape.gradient(spec_loss, outputs["ta"]) is None
    # The spec term's gradient is the two specs' (independent reference: each spec's own loss).
    variables = model.network.trainable_variables
    got = tape.gradient(spec_loss, variables)
    expected = [tf.zeros_like(v) for v in variables]
    for in_place in model.training_strategy.passes:
        with tf.GradientTape() as spec_tape:
            own = tf.reduce_mean(losses.distillation_loss(in_place(x, training=True), outputs["ta"], "binary")) / 2
        expected = [e + g for e, g in zip(expected, spec_tape.gradient(own, variables), strict=True)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(e), atol=1e-6)
    # Evaluation runs no spec.
    assert model.training_strategy.extra_losses(model, x, targets, outputs["ta"], training=False) == {}


# ---- FixedMatTA -----------------------------------------------------------------------------------------
def test_fixed_matta_is_bit_identical_to_the_default_model_and_matches_a_hand_written_step():
    x, y = binary_data(96)
    states = []
    for strategy in (None, FixedMatTA()):
        model = MatTAModel(dense_network("relu"), training_strategy=strategy, loss_weights=(1.0, 0.5, 2.0))
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
        states.append((model.network.get_weights(), history["loss"]))
    for weights, history in states[1:]:
        assert history == states[0][1]
        for a, b in zip(states[0][0], weights, strict=True):
            np.testing.assert_array_equal(a, b)
    # The same 6 steps, written out: L = L_S + 0.5 L_TA + 2 L_D with Adam.
    network = dense_network("relu")
    optimizer = keras.optimizers.Adam(0.01)
    for _ in range(2):
        for start in range(0, 96, 32):
            xb, yb = x[start:start + 32], y[start:start + 32].reshape(-1, 1).astype("float32")
            with tf.GradientTape() as tape:
                student, ta = network(xb, training=True)
                loss = tf.reduce_mean(losses.student_loss(yb, student, "binary")
                                      + 0.5 * losses.ta_loss(yb, ta, "binary")
                                      + 2.0 * losses.distillation_loss(student, ta, "binary"))
            optimizer.apply(tape.gradient(loss, network.trainable_variables), network.trainable_variables)
    for a, b in zip(states[0][0], network.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ---- Sandwich end to end ----------------------------------------------------------------------------------
def test_sandwich_trains_the_relevance_network_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    network = build_relevance_network(SCHEMA, CONFIG)
    model = MatTAModel(network, training_strategy=Sandwich(k=1, pool_size=2, seed=1, label_weight=0.5))
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    features = relevance_features(64, seed=3)
    y = (ops.convert_to_numpy(features[preprocessed_name(SCHEMA.feature("price"))]) > 1).astype("int64")
    spec = model.training_strategy.pool[0]
    before = ops.convert_to_numpy(model.training_strategy.passes[0](features))
    history = model.fit(features, y, batch_size=16, epochs=3, verbose=0).history
    assert {"sandwich_loss", "sandwich_label_loss"} <= set(history)
    assert all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    after = ops.convert_to_numpy(model.training_strategy.passes[0](features))
    assert not np.allclose(before, after)  # the mixed spec's weights moved with the shared network
    np.testing.assert_allclose(after, ops.convert_to_numpy(extract_submodel(network, spec)(features)), atol=1e-5)
    path = str(tmp_path / "sandwich.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.training_strategy, Sandwich)
    assert [s.choices for s in loaded.training_strategy.pool] == [s.choices for s in model.training_strategy.pool]
    assert loaded.training_strategy.get_config() == model.training_strategy.get_config()
    np.testing.assert_allclose(ops.convert_to_numpy(loaded.training_strategy.passes[0](features)), after, atol=1e-6)


def test_sandwich_under_jit_compile_takes_the_same_steps():
    # Under XLA every pool member runs, those not drawn weighted 0; outside, a conditional per member.
    x, y = binary_data(64, seed=2)
    states = []
    for jit_compile in (False, True):
        model = MatTAModel(dense_network(), training_strategy=Sandwich(k=1, seed=4))
        model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit_compile)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
        states.append((model.network.get_weights(), history["sandwich_loss"]))
    np.testing.assert_allclose(states[1][1], states[0][1], rtol=1e-5)
    for a, b in zip(states[0][0], states[1][0], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sandwich_under_a_mirrored_strategy_matches_one_device():
    x, y = binary_data(64, seed=2)
    states = []
    # ReductionToOneDevice: CPU collectives keep instance keys per process, so another test's MirroredStrategy
    # run in the same pytest process would collide with this one (as tests/test_shampoo.py notes).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    for distribution in (tf.distribute.get_strategy(), mirrored):
        with distribution.scope():
            model = MatTAModel(dense_network(), training_strategy=Sandwich(k=1, seed=4),
                               ta_learning_rate_multiplier=0.25)
            model.compile(optimizer=keras.optimizers.Adam(0.01))
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
        states.append((model.network.get_weights(), history["sandwich_loss"]))
    assert distribution.num_replicas_in_sync == 2
    np.testing.assert_allclose(states[1][1], states[0][1], rtol=1e-5)
    for a, b in zip(states[0][0], states[1][0], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ---- per-group learning rates -------------------------------------------------------------------------------
def numpy_adam(state: dict, gradient: np.ndarray, learning_rate: np.ndarray, step: int,
               beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7) -> np.ndarray:
    """Keras' Adam update (Kingma & Ba, with Keras' epsilon placement) with a per-element learning rate."""
    state["m"] = beta_1 * state.get("m", 0.0) + (1 - beta_1) * gradient
    state["v"] = beta_2 * state.get("v", 0.0) + (1 - beta_2) * gradient**2
    alpha = learning_rate * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    return -alpha * state["m"] / (np.sqrt(state["v"]) + epsilon)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ta_learning_rate_multiplier_matches_a_numpy_per_element_learning_rate(optimizer):
    x, y = binary_data(48, seed=1)
    learning_rate, multiplier, steps = 0.05, 0.2, 3
    model = MatTAModel(dense_network(), ta_learning_rate_multiplier=multiplier)
    make = {"sgd": lambda: keras.optimizers.SGD(learning_rate), "adam": lambda: keras.optimizers.Adam(learning_rate)}
    model.compile(optimizer=make[optimizer]())
    # The reference: the same network and loss, gradients from TF, the update in numpy.
    reference = MatTAModel(dense_network())
    reference.compile(optimizer=keras.optimizers.SGD(0.0))
    weights = {v.path: ops.convert_to_numpy(v).astype(np.float64) for v in reference.network.trainable_variables}
    rates = {path: learning_rate * np.where(STUDENT[path], 1.0, multiplier) for path in weights}
    adam_states = {path: {} for path in weights}
    for step in range(1, steps + 1):
        for v in reference.network.trainable_variables:
            v.assign(weights[v.path].astype("float32"))
        for path, gradient in step_gradients(reference, x, y).items():
            gradient = gradient.astype(np.float64)
            if optimizer == "sgd":
                weights[path] = weights[path] - rates[path] * gradient
            else:
                weights[path] = weights[path] + numpy_adam(adam_states[path], gradient, rates[path], step)
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    for v in model.network.trainable_variables:
        np.testing.assert_allclose(ops.convert_to_numpy(v), weights[v.path], rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_ta_learning_rate_multiplier_of_one_changes_nothing_and_bad_values_are_named():
    x, y = binary_data(48, seed=1)
    results = []
    for multiplier in (None, 1.0):
        model = MatTAModel(dense_network(), ta_learning_rate_multiplier=multiplier)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        results.append(model.network.get_weights())
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="ta_learning_rate_multiplier"):
            MatTAModel(dense_network(), ta_learning_rate_multiplier=bad)
