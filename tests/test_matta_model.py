"""`MatTAModel` with compile/fit/evaluate/predict: metrics against numpy, modes, saving, jit, errors."""

import keras
import numpy as np
import pytest
from keras import ops

from matta_tf.data import Label
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.training import DistillationSchedule, IndependentStudentTA, MatTAModel

FEATURES = 6
NUM_CLASSES = 4


def nested_network(width: int = 1, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    hidden = NestedDense(4, 16, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, list(NestedDense(width, width, name="logits")(hidden)), name="nested")


def independent_network(seed: int = 0) -> IndependentStudentTA:
    keras.utils.set_random_seed(seed)
    student = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)], name="student"
    )
    ta = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)], name="ta"
    )
    return IndependentStudentTA(student, ta)


def binary_data(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=FEATURES) + rng.normal(size=n) > 0).astype("int64")
    return x, y


def np_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact weighted ROC AUC: P(score of a positive > score of a negative), ties count one half."""
    weights = np.ones(len(labels)) if weights is None else weights
    positive, negative = labels == 1, labels == 0
    diff = scores[positive][:, None] - scores[negative][None, :]
    pair_weights = weights[positive][:, None] * weights[negative][None, :]
    return float((pair_weights * ((diff > 0) + 0.5 * (diff == 0))).sum() / pair_weights.sum())


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def compiled(model: MatTAModel, learning_rate: float = 0.01, **kwargs) -> MatTAModel:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), **kwargs)
    return model


STUDENT_METRICS = {"loss", "student_loss", "student_auc", "student_auc_loss", "student_log_loss", "invalid_labels"}


def test_evaluated_metrics_match_numpy_on_the_model_predictions():
    x, y = binary_data(300, seed=4)
    sample_weight = np.random.default_rng(5).uniform(0.2, 2.0, size=len(y)).astype("float32")
    schedule = DistillationSchedule(start_step=0, ramp_steps=40)
    model = compiled(
        MatTAModel(
            nested_network(), loss_weights=(1.0, 0.5, 2.0), distillation_schedule=schedule, auc_num_thresholds=2000
        )
    )
    model.fit(x, y, batch_size=30, epochs=1, verbose=0)  # 10 steps: w_D = 2 * 10 / 40
    logits = {k: ops.convert_to_numpy(v).astype(np.float64) for k, v in model(x).items()}
    results = model.evaluate(x, y, sample_weight=sample_weight, batch_size=len(y), verbose=0, return_dict=True)

    p = {k: np_sigmoid(v[:, 0]) for k, v in logits.items()}
    log_loss = {k: -(y * np.log(p[k]) + (1 - y) * np.log(1 - p[k])) for k in p}
    distill = -(p["ta"] * np.log(p["student"]) + (1 - p["ta"]) * np.log(1 - p["student"]))
    mean = lambda v: float(np.sum(sample_weight * v) / len(v))
    w_d = 2.0 * 10 / 40
    expected = {
        "student_loss": mean(log_loss["student"]),
        "ta_loss": mean(log_loss["ta"]),
        "distillation_loss": mean(distill),
        "distillation_weight": w_d,
        "loss": mean(log_loss["student"]) + 0.5 * mean(log_loss["ta"]) + w_d * mean(distill),
        "student_log_loss": float(np.average(log_loss["student"], weights=sample_weight)),
        "ta_log_loss": float(np.average(log_loss["ta"], weights=sample_weight)),
        "churn": float(np.average((p["student"] >= 0.5) != (p["ta"] >= 0.5), weights=sample_weight)),
    }
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for stream in ("student", "ta"):
        auc = np_auc(y, p[stream], sample_weight)
        assert results[f"{stream}_auc"] == pytest.approx(auc, abs=2e-3)
        assert results[f"{stream}_auc_loss"] == pytest.approx(1.0 - results[f"{stream}_auc"], abs=1e-6)


def test_soft_binary_labels_use_the_half_threshold_for_auc():
    x, y = binary_data(200, seed=6)
    teacher = np.clip(0.5 + (y - 0.5) * np.random.default_rng(7).uniform(0.1, 0.9, size=len(y)), 0, 1)
    teacher = teacher.astype("float32")
    label = Label("teacher", source="teacher", task="binary", representation="probabilities")
    model = compiled(MatTAModel(nested_network(), label=label, auc_num_thresholds=2000))
    results = model.evaluate(x, teacher, batch_size=len(y), verbose=0, return_dict=True)
    scores = np_sigmoid(ops.convert_to_numpy(model(x)["student"])[:, 0])
    assert results["student_auc"] == pytest.approx(np_auc((teacher >= 0.5).astype(int), scores), abs=2e-3)
    soft_loss = -(teacher * np.log(scores) + (1 - teacher) * np.log(1 - scores)).mean()
    assert results["student_loss"] == pytest.approx(soft_loss, rel=1e-4)


def test_multiclass_teacher_logits_train_and_auc_is_one_vs_rest_macro():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(240, FEATURES)).astype("float32")
    teacher_logits = (x @ rng.normal(size=(FEATURES, NUM_CLASSES))).astype("float32")
    label = Label("teacher", source="teacher", task="multiclass", num_classes=NUM_CLASSES, representation="logits")
    model = compiled(MatTAModel(nested_network(NUM_CLASSES), label=label, auc_num_thresholds=2000))
    history = model.fit(x, teacher_logits, batch_size=40, epochs=2, verbose=0)
    assert history.history["student_loss"][-1] < history.history["student_loss"][0]
    results = model.evaluate(x, teacher_logits, batch_size=len(x), verbose=0, return_dict=True)
    probabilities = model.predict(x, verbose=0)
    hard = teacher_logits.argmax(axis=1)
    for stream in ("student", "ta"):
        macro = np.mean([np_auc((hard == c).astype(int), probabilities[stream][:, c]) for c in range(NUM_CLASSES)])
        assert results[f"{stream}_auc"] == pytest.approx(macro, abs=3e-3)
    churn = np.mean(probabilities["student"].argmax(axis=1) != probabilities["ta"].argmax(axis=1))
    assert results["churn"] == pytest.approx(churn, abs=1e-6)


def test_dict_labels_are_read_at_the_label_name():
    x, y = binary_data()
    model = compiled(MatTAModel(nested_network(), label=Label("click")))
    results = model.evaluate(x, {"click": y, "other": 1 - y}, batch_size=len(y), verbose=0, return_dict=True)
    p = np_sigmoid(ops.convert_to_numpy(model(x)["student"])[:, 0])
    assert results["student_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rel=1e-4)
    with pytest.raises(ValueError, match=r"without the key `click`.*Received: keys=\['other'\]"):
        model.evaluate(x, {"other": y}, verbose=0)


def test_predict_returns_both_streams_as_probabilities_or_logits():
    x, _ = binary_data(40)
    network = nested_network()
    student_logits, ta_logits = (ops.convert_to_numpy(t) for t in network(x))
    probabilities = MatTAModel(network).predict(x, verbose=0)
    assert set(probabilities) == {"student", "ta"}
    np.testing.assert_allclose(probabilities["student"], np_sigmoid(student_logits), rtol=1e-5)
    np.testing.assert_allclose(probabilities["ta"], np_sigmoid(ta_logits), rtol=1e-5)
    logits = MatTAModel(network, predictions="logits").predict(x, verbose=0)
    np.testing.assert_allclose(logits["ta"], ta_logits, rtol=1e-6)


def test_saved_model_reloads_with_schedule_optimizer_state_and_identical_predictions(tmp_path):
    x, y = binary_data()
    schedule = DistillationSchedule(start_step=3, ramp_steps=20, curve="cosine")
    model = compiled(
        MatTAModel(nested_network(), loss_weights=(1.0, 0.5, 2.0), distillation_schedule=schedule, predictions="logits")
    )
    model.fit(x, y, batch_size=50, epochs=2, verbose=0)
    path = str(tmp_path / "matta.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MatTAModel)
    assert loaded.distillation_schedule == schedule and loaded.loss_weights == (1.0, 0.5, 2.0)
    assert loaded.mode == "matta" and loaded.label == model.label and loaded.predictions == "logits"
    assert int(loaded.optimizer.iterations) == 8
    assert float(loaded.distillation_weight()) == pytest.approx(float(model.distillation_weight()))
    before, after = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for stream in ("student", "ta"):
        np.testing.assert_array_equal(before[stream], after[stream])
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    loaded.fit(x, y, batch_size=50, epochs=1, verbose=0)  # training resumes from the same state
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6, atol=1e-7)


def test_saved_model_without_parameter_sharing_reloads_with_identical_predictions(tmp_path):
    x, _ = binary_data(40)
    model = MatTAModel(independent_network(), mode="student_only")
    path = str(tmp_path / "independent.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.network, IndependentStudentTA) and loaded.mode == "student_only"
    before, after = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for stream in ("student", "ta"):
        np.testing.assert_array_equal(before[stream], after[stream])


def test_jit_compiled_training_matches_graph_training():
    x, y = binary_data()
    sample_weight = np.linspace(0.5, 1.5, len(y)).astype("float32")
    results = []
    for jit_compile in (False, True):
        model = compiled(
            MatTAModel(nested_network(), distillation_schedule=DistillationSchedule(0, 5)), jit_compile=jit_compile
        )
        history = model.fit(x, y, sample_weight=sample_weight, batch_size=40, epochs=1, shuffle=False, verbose=0)
        assert model.jit_compile is jit_compile
        results.append(([ops.convert_to_numpy(w) for w in model.weights], history.history))
    (graph_weights, graph_history), (jit_weights, jit_history) = results
    for a, b in zip(graph_weights, jit_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in graph_history:
        np.testing.assert_allclose(graph_history[name], jit_history[name], rtol=1e-4, atol=1e-5, err_msg=name)


def ta_only_entries(network: keras.Model) -> list[np.ndarray]:
    hidden, logits = network.get_layer("hidden"), network.get_layer("logits")
    return [
        ops.convert_to_numpy(hidden.kernel)[:, 4:],
        ops.convert_to_numpy(hidden.bias)[4:],
        ops.convert_to_numpy(logits.kernel)[4:],
    ]


def test_student_only_mode_leaves_the_ta_untouched_and_ta_only_trains_it():
    x, y = binary_data()
    network = nested_network()
    before = ta_only_entries(network)
    student_before = ops.convert_to_numpy(network.get_layer("hidden").kernel)[:, :4]
    compiled(MatTAModel(network, mode="student_only")).fit(x, y, batch_size=50, epochs=1, verbose=0)
    for a, b in zip(before, ta_only_entries(network), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.any(ops.convert_to_numpy(network.get_layer("hidden").kernel)[:, :4] != student_before)
    compiled(MatTAModel(network, mode="ta_only")).fit(x, y, batch_size=50, epochs=1, verbose=0)
    assert all(np.any(a != b) for a, b in zip(before, ta_only_entries(network), strict=True))


def test_no_sharing_student_only_does_not_move_the_ta_network():
    x, y = binary_data()
    network = independent_network()
    ta_before = [ops.convert_to_numpy(w) for w in network.ta.weights]
    model = compiled(MatTAModel(network, mode="student_only"))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    for a, b in zip(ta_before, network.ta.weights, strict=True):
        np.testing.assert_array_equal(a, ops.convert_to_numpy(b))
    assert set(model.metrics_names) == STUDENT_METRICS


# ---- errors name the argument and the value ------------------------------------------------------------
def test_bad_constructor_arguments_are_rejected_by_name():
    network = nested_network()
    with pytest.raises(
        ValueError,
        match=r"^`loss_weights` must be three non-negative numbers. "
        r"Received: loss_weights=\(1, -1, 0\)$",
    ):
        MatTAModel(network, loss_weights=(1, -1, 0))
    with pytest.raises(ValueError, match=r"Received: loss_weights=\(1.0, 2.0\)"):
        MatTAModel(network, loss_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"weight 0. Received: mode='student_only', loss_weights=\(0, 1, 1\)"):
        MatTAModel(network, mode="student_only", loss_weights=(0, 1, 1))
    with pytest.raises(
        ValueError,
        match=r"`mode` must be one of \['matta', 'student_only', 'ta_only'\]. "
        r"Received: mode='teacher'",
    ):
        MatTAModel(network, mode="teacher")
    with pytest.raises(ValueError, match=r"`predictions` must be one of .* Received: predictions='probs'"):
        MatTAModel(network, predictions="probs")
    with pytest.raises(ValueError, match=r"`network` must be a Keras layer or model"):
        MatTAModel(lambda x: (x, x))
    with pytest.raises(ValueError, match=r"`distillation_schedule` must be a `DistillationSchedule`"):
        MatTAModel(network, distillation_schedule=0.5)


def test_networks_that_do_not_return_a_logit_pair_are_rejected_with_what_they_returned():
    x, y = binary_data(8)
    inputs = keras.Input((FEATURES,))
    single = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(
        ValueError,
        match=r"must return a pair `\(student_logits, ta_logits\)`. "
        r"Received: one tensor of shape \(8, 1\)",
    ):
        MatTAModel(single)(x)
    as_dict = keras.Model(inputs, {"a": keras.layers.Dense(1)(inputs), "b": keras.layers.Dense(1)(inputs)})
    with pytest.raises(ValueError, match=r"Received: a dict with keys \['a', 'b'\]"):
        MatTAModel(as_dict)(x)
    wide = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(3)(inputs)])
    with pytest.raises(ValueError, match=r"\(batch, 1\) for a binary label .* Received: ta_logits.shape=\(8, 3\)"):
        MatTAModel(wide)(x)


def test_compile_rejects_a_loss_or_metrics():
    model = MatTAModel(nested_network())
    with pytest.raises(ValueError, match=r"takes no `loss`.*Received: loss='mse'"):
        model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"takes no `metrics`"):
        model.compile(optimizer="adam", metrics=["auc"])


def test_training_strategy_and_ta_learning_rate_multiplier_round_trip_through_the_config():
    from matta_tf.training import FixedMatTA, Sandwich

    default = MatTAModel(nested_network())
    assert isinstance(default.training_strategy, FixedMatTA) and default.ta_learning_rate_multiplier is None
    assert isinstance(MatTAModel.from_config(default.get_config()).training_strategy, FixedMatTA)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    hidden = NestedDense(4, 8, name="hidden_1")(NestedDense(4, 8, name="hidden_0")(inputs))
    two_layers = keras.Model(inputs, list(NestedDense(1, 1, name="logits")(hidden)))
    model = MatTAModel(two_layers, training_strategy=Sandwich(k=1, pool_size=1), ta_learning_rate_multiplier=0.5)
    restored = MatTAModel.from_config(model.get_config())
    assert restored.training_strategy.get_config() == model.training_strategy.get_config()
    assert [s.choices for s in restored.training_strategy.pool] == [s.choices for s in model.training_strategy.pool]
    assert restored.ta_learning_rate_multiplier == 0.5
    # One choosable layer has no mixed spec: Sandwich says so instead of training nothing more.
    with pytest.raises(ValueError, match="no extractable mixed spec"):
        MatTAModel(nested_network(), training_strategy=Sandwich())
