"""Training to a plateau (`pipelines.train.Plateau`): the stopping rule every arm of the ablation shares."""

import numpy as np
import pytest

from matta_tf.data import SyntheticConfig, generate_synthetic
from matta_tf.models.relevance import RelevanceConfig
from matta_tf.pipelines.config import TrainingConfig
from matta_tf.pipelines.train import Plateau, train_relevance


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("plateau") / "events")
    generate_synthetic(directory, SyntheticConfig(num_users=40, num_items=30, num_events=3000, num_shards=1,
                                                  latent_dim=4, nonlinear_units=8, seed=3), progress=False)
    return directory


@pytest.mark.parametrize("curve, patience, min_delta, stops_after, best", [
    ([0.40, 0.35, 0.36, 0.37, 0.30], 2, 0.0, 4, 2),     # two epochs without a gain after epoch 2: stop
    ([0.40, 0.35, 0.36, 0.34, 0.33], 2, 0.0, 5, 5),     # a gain in time: runs to the cap
    ([0.40, 0.39, 0.385, 0.30, 0.2], 2, 0.02, 3, 1),    # gains below min_delta do not count
])
def test_the_callback_follows_the_rule_and_restores_the_best_weights(curve, patience, min_delta, stops_after, best):
    import keras

    from matta_tf.training import PlateauStopping

    network = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    values = iter(curve)
    callback = PlateauStopping(lambda: {"auc_loss": next(values)}, "auc_loss", patience=patience, min_delta=min_delta,
                               weights_of=network, log_name="val_student_exact_auc_loss")
    callback.set_model(network)
    network.stop_training = False
    weights_at = {}
    for epoch in range(len(curve)):
        network.set_weights([np.full_like(w, epoch + 1.0) for w in network.get_weights()])  # "training"
        weights_at[epoch + 1] = network.get_weights()
        logs = {}
        callback.on_epoch_end(epoch, logs)
        assert logs["val_student_exact_auc_loss"] == curve[epoch]
        if network.stop_training:
            break
    callback.on_train_end()
    assert callback.epochs_run == stops_after and callback.best_epoch + 1 == best
    for restored, expected in zip(network.get_weights(), weights_at[best], strict=True):
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.slow
def test_training_stops_at_the_plateau_and_keeps_the_best_epoch(events):
    training = TrainingConfig(labels="event", optimizer="adam", learning_rate=0.05, epochs=8, batch_size=128,
                              model=RelevanceConfig(embedding_dim=4, tower_units=(8,), head_units=(8,)))
    rule = Plateau(patience=1)
    run = train_relevance(events, None, training, arm="student_only", verbose=0, plateau=rule)
    curve = run.history["val_student_exact_auc_loss"]
    plateau = run.metrics["plateau"]
    assert plateau["epochs_run"] == len(curve) <= 8
    best = int(np.argmin(curve))
    assert plateau["best_epoch"] == best + 1 and plateau["validation_auc_loss"] == pytest.approx(min(curve))
    # The rule: it ran to the cap, or stopped exactly `patience` epochs after the best one.
    assert len(curve) == 8 or len(curve) - 1 - best == rule.patience
    # The network was put back to the best epoch: its validation quality now is the best one seen.
    assert run.metrics["validation"]["label"]["student"]["auc_loss"] == pytest.approx(min(curve), abs=1e-9)


def test_the_callback_keeps_another_metrics_best_epoch_without_restoring_or_deciding_by_it():
    import keras

    from matta_tf.training import PlateauStopping

    network = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    curves = iter([{"student": 0.40, "ta": 0.30}, {"student": 0.35, "ta": 0.20}, {"student": 0.33, "ta": 0.25},
                   {"student": 0.34, "ta": float("nan")}, {"student": 0.36, "ta": 0.10},
                   {"student": 0.10, "ta": 0.05}])  # never reached: the Student's plateau stops at epoch 5
    callback = PlateauStopping(lambda: next(curves), "student", patience=2, weights_of=network, keep_best_of=["ta"])
    callback.set_model(network)
    network.stop_training = False
    for epoch in range(6):
        network.set_weights([np.full_like(w, epoch + 1.0) for w in network.get_weights()])
        callback.on_epoch_end(epoch)
        if network.stop_training:
            break
    callback.on_train_end()
    assert callback.epochs_run == 5 and callback.best_epoch == 2  # the TA's best (epoch 5) decided nothing
    assert callback.best_of["ta"][:2] == (4, 0.10)  # a NaN TA epoch is no best
    assert all((w == 3.0).all() for w in network.get_weights())  # restored: the Student's best epoch
    assert all((w == 5.0).all() for w in callback.best_of["ta"][2])
    for bad in ("ta", ["student"]):
        with pytest.raises(ValueError, match="keep_best_of"):
            PlateauStopping(lambda: {}, "student", keep_best_of=bad)
    for metric, kept in (("student", ["ta"]), ("loss", [])):
        missing = PlateauStopping(lambda: {"student": 0.3}, metric, keep_best_of=kept)
        missing.set_model(network)
        with pytest.raises(KeyError, match=r"returned no \['(ta|loss)'\]; it returned \['student'\]"):
            missing.on_epoch_end(0)


def test_both_streams_are_scored_every_epoch_and_the_deciding_one_picks_the_epoch_restored(events):
    training = TrainingConfig(labels="event", optimizer="adam", learning_rate=0.05, epochs=3, batch_size=256,
                              model=RelevanceConfig(embedding_dim=2, tower_units=(4,), head_units=(4,)))
    run = train_relevance(events, None, training, arm="matta", verbose=0, plateau=Plateau(patience=1, stream="ta"))
    plateau = run.metrics["plateau"]
    per_epoch = plateau["validation_auc_loss_per_epoch"]
    assert len(per_epoch["student"]) == len(per_epoch["ta"]) == plateau["epochs_run"]
    assert run.history["val_ta_exact_auc_loss"] == pytest.approx(per_epoch["ta"])  # the deciding stream's log
    best = plateau["best_epoch"] - 1
    assert per_epoch["ta"][best] == min(per_epoch["ta"]) == pytest.approx(plateau["validation_auc_loss"])
    # Restored to the TA's best epoch: the validation evaluated afterwards is that epoch's, for both streams.
    validation = run.metrics["validation"]["label"]
    assert validation["ta"]["auc_loss"] == pytest.approx(per_epoch["ta"][best], abs=1e-9)
    assert validation["student"]["auc_loss"] == pytest.approx(per_epoch["student"][best], abs=1e-9)
    # The Student at its own best epoch (kept, not restored): its validation figure and its weights.
    own = plateau["at_its_own_best"]
    student_best = int(np.argmin(per_epoch["student"]))
    assert own["stream"] == "student" and own["best_epoch"] == student_best + 1
    assert own["validation_auc_loss"] == min(per_epoch["student"]) and set(own["test"]) == {"label"}
    network = run.network
    restored = [np.array(w) for w in network.get_weights()]
    network.set_weights(run.best_weights["student"])
    from matta_tf.extraction.evaluate import binary_metrics
    from matta_tf.pipelines.train import evaluation_dataset

    pairs = [(np.asarray(network(x, training=False)[0]).reshape(-1), np.asarray(y).reshape(-1))
             for x, y in evaluation_dataset(events, "validation", batch_size=512)]
    student_logits, labels = (np.concatenate(part) for part in zip(*pairs, strict=True))
    assert binary_metrics(labels, student_logits)["auc_loss"] == pytest.approx(min(per_epoch["student"]), abs=1e-9)
    for weight, expected in zip(run.best_weights["ta"], restored, strict=True):
        np.testing.assert_array_equal(weight, expected)  # the network as returned: the TA's best epoch


def test_plateau_arguments_are_checked():
    for kwargs, message in (({"patience": 0}, "patience"), ({"min_delta": -1.0}, "min_delta"),
                            ({"stream": "teacher"}, "stream")):
        with pytest.raises(ValueError, match=f"`{message}`"):
            Plateau(**kwargs)


def test_offline_distillation_trains_on_the_teachers_ta_probabilities():
    import keras
    import tensorflow as tf

    from matta_tf.pipelines.train import _soft_labels

    class Pair(keras.layers.Layer):  # a frozen "teacher": Student and TA logits from one input
        def call(self, features, training=False):
            x = features["x"]
            return -x, 3.0 * x - 1.0

    features = {"x": tf.constant([[-1.0], [0.0], [0.5], [2.0]])}
    labels = tf.constant([1.0, 0.0, 1.0, 0.0])  # the events' labels: replaced
    relabelled_features, targets = _soft_labels(Pair())(features, labels)
    expected = 1.0 / (1.0 + np.exp(-(3.0 * np.array([-1.0, 0.0, 0.5, 2.0]) - 1.0)))
    assert targets.shape == labels.shape
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)
    assert relabelled_features is features


def test_a_student_distilled_offline_learns_the_teachers_scores_from_event_labelled_data(events):
    from matta_tf.pipelines.train import evaluation_dataset

    model = RelevanceConfig(embedding_dim=4, tower_units=(8,), head_units=(8,))
    training = TrainingConfig(labels="event", optimizer="adam", learning_rate=0.05, epochs=3, batch_size=128,
                              model=model)
    teacher = train_relevance(events, None, training, arm="ta_only", verbose=0).network
    student = train_relevance(events, None, training, arm="student_only", verbose=0, distill_from=teacher).network
    test = evaluation_dataset(events)
    teacher_scores = np.concatenate([teacher(x, training=False)[1].numpy().ravel() for x, _ in test])
    student_scores = np.concatenate([student(x, training=False)[0].numpy().ravel() for x, _ in test])
    # Soft targets in [0, 1] are accepted for an event label (class indices) and learnt: the Student ranks
    # the test events as its teacher does.
    assert np.corrcoef(teacher_scores, student_scores)[0, 1] > 0.8


def test_the_shared_embedding_no_sharing_arm_trains_both_streams(events):
    """`arm="no_sharing_shared_embeddings"` (Table 4's ablation) trains with MatTA's three losses end to end."""
    model = RelevanceConfig(embedding_dim=4, tower_units=(8,), head_units=(8,))
    training = TrainingConfig(labels="event", optimizer="adam", learning_rate=0.02, epochs=2, batch_size=128,
                              model=model)
    run = train_relevance(events, None, training, arm="no_sharing_shared_embeddings", verbose=0)
    history = run.history
    assert run.network.name == "shared_embeddings"
    for stream in ("student", "ta"):
        assert history[f"{stream}_loss"][-1] < history[f"{stream}_loss"][0], stream
        assert run.metrics["test"]["label"][stream]["auc_loss"] < 0.5, stream
    assert "distillation_loss" in history
