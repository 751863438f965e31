"""Early stopping on MatTA co-training keeps the Student's best epoch, not the ramped total's."""

import keras
import numpy as np
import pytest

from matta_tf.layers import NestedDense
from matta_tf.training import DistillationSchedule, MatTAModel

EPOCHS, BATCH = 12, 32


def _data(rng: np.random.Generator, weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, weights.size)).astype("float32")
    flipped = rng.random(n) < 0.2  # label noise: the Student overfits a small training set
    return x, ((x @ weights > 0) ^ flipped).astype("int64")


def _model(steps: int) -> MatTAModel:
    inputs = keras.Input((16,))
    hidden = NestedDense(32, 64, activation="relu")(inputs)
    network = keras.Model(inputs, NestedDense(1, 1)(hidden))
    # w_D ramps from 0 to 5 over the whole run: the total val_loss rises every epoch.
    model = MatTAModel(network, loss_weights=(1.0, 1.0, 5.0), distillation_schedule=DistillationSchedule(0, steps))
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    return model


def test_early_stopping_on_the_student_log_loss_keeps_the_students_best_epoch():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=16)
    (x, y), validation = _data(rng, weights, 128), _data(rng, weights, 512)
    model = _model(EPOCHS * len(x) // BATCH)
    assert model.early_stopping_monitor == "val_student_log_loss"
    callback = model.early_stopping(patience=EPOCHS)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=validation, verbose=0,
                        callbacks=[callback]).history
    total, student = np.array(history["val_loss"]), np.array(history["val_student_log_loss"])
    # The crafted situation: the ramped total only rises, so monitoring it keeps epoch 0 ...
    assert np.all(np.diff(total) > 0), total
    best = int(np.argmin(student))
    # ... while the Student first improves, then overfits: its best epoch is neither the first nor the last.
    assert 0 < best < EPOCHS - 1, student
    assert student[0] > student[best] + 0.02 and student[-1] > student[best] + 0.02, student
    assert callback.best_epoch == best
    # The restored weights are the Student's best epoch's: evaluating them gives its validation log loss.
    restored = model.evaluate(*validation, return_dict=True, verbose=0)["student_log_loss"]
    np.testing.assert_allclose(restored, student[best], rtol=1e-5)


def test_early_stopping_monitor_follows_the_mode_and_refuses_the_ramped_total():
    network = keras.Sequential([keras.Input((4,)), NestedDense(1, 1)])
    assert MatTAModel(network, mode="ta_only").early_stopping_monitor == "val_ta_log_loss"
    model = MatTAModel(network)
    callback = model.early_stopping(monitor="val_student_auc_loss", patience=3)
    assert (callback.monitor, callback.patience, callback.restore_best_weights) == ("val_student_auc_loss", 3, True)
    with pytest.raises(ValueError, match=r"`monitor` must be one of .*Received: monitor='val_loss'"):
        model.early_stopping(monitor="val_loss")
