"""A short MatTA run on real MovieLens events: Student and TA train with Adam, every ablation mode runs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import MovieLensConfig, Schema, lookup_layer, make_dataset, prepare_movielens
from matta_tf.data.movielens import load_ratings
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.training import DistillationSchedule, IndependentStudentTA, MatTAModel

FEATURES = (
    "user_id",
    "movie_id",
    "hour_of_day",
    "day_of_week",
    "history_count",
    "history_positive_rate",
    "release_year",
)
EMBEDDING_DIM = 8


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> tuple[Schema, tf.data.Dataset, tf.data.Dataset]:
    """Events of the first 25 users, as (feature indices, label) batches for train and validation."""
    directory = str(tmp_path_factory.mktemp("movielens"))
    ratings = load_ratings()
    prepare_movielens(
        directory, MovieLensConfig(num_shards=1), ratings=ratings[ratings["userId"] <= 25], progress=False
    )
    schema = Schema.load(directory)
    lookups = {name: lookup_layer(schema.feature(name)) for name in FEATURES}

    def split(name: str) -> tf.data.Dataset:
        events = make_dataset(f"{directory}/{name}", schema, 256, labels="label")
        return events.map(lambda x, y: ({n: lookups[n](x[n]) for n in FEATURES}, y)).cache()

    return schema, split("train"), split("validation")


def embedded_features(schema: Schema) -> tuple[dict, keras.KerasTensor]:
    inputs = {name: keras.Input((), dtype="int64", name=name) for name in FEATURES}
    embedded = [keras.layers.Embedding(schema.feature(n).cardinality, EMBEDDING_DIM)(inputs[n]) for n in FEATURES]
    return inputs, keras.layers.Concatenate()(embedded)


def nested_network(schema: Schema) -> keras.Model:
    """Shared embeddings, then a nested MLP: Student 16 -> 8 -> 1, TA 64 -> 32 -> 1."""
    inputs, x = embedded_features(schema)
    x = NestedDense(16, 64, activation="relu")(x)
    x = NestedDense(8, 32, activation="relu")(x)
    return keras.Model(inputs, list(NestedDense(1, 1)(x)), name="nested")


def plain_network(schema: Schema, units: tuple[int, ...], name: str) -> keras.Model:
    inputs, x = embedded_features(schema)
    for width in units:
        x = keras.layers.Dense(width, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x), name=name)


def train(network: keras.Model, mode: str, train_data, validation_data) -> dict[str, list[float]]:
    """The one entry point of every variant: the network and the mode are the only differences."""
    model = MatTAModel(network, mode=mode, distillation_schedule=DistillationSchedule(start_step=5, ramp_steps=20))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    return model.fit(train_data, epochs=2, validation_data=validation_data, verbose=0).history


STREAM_METRICS = ("auc", "auc_loss", "log_loss", "loss")


@pytest.mark.parametrize("variant", ["matta", pytest.param("student_only", marks=pytest.mark.slow),
                                     pytest.param("ta_only", marks=pytest.mark.slow), "matta_no_sharing"])
def test_movielens_run_trains_and_reports_every_metric(movielens, variant):
    schema, train_data, validation_data = movielens
    keras.utils.set_random_seed(0)
    if variant == "matta_no_sharing":
        network = IndependentStudentTA(plain_network(schema, (16, 8), "student"), plain_network(schema, (64, 32), "ta"))
    else:
        network = nested_network(schema)
    mode = "matta" if variant == "matta_no_sharing" else variant
    history = train(network, mode, train_data, validation_data)

    streams = {"matta": ("student", "ta"), "student_only": ("student",), "ta_only": ("ta",)}[mode]
    expected = {"loss", "invalid_labels"} | {f"{stream}_{metric}" for stream in streams for metric in STREAM_METRICS}
    if mode == "matta":
        expected |= {"distillation_loss", "distillation_weight", "churn"}
    assert set(history) == expected | {f"val_{name}" for name in expected}
    for name, values in history.items():
        assert len(values) == 2 and np.all(np.isfinite(values)), name
    for stream in streams:
        assert history[f"{stream}_loss"][-1] < history[f"{stream}_loss"][0], stream
        assert history[f"{stream}_auc"][-1] > 0.6, stream  # learned something beyond chance
        assert 0.0 <= history[f"val_{stream}_auc"][-1] <= 1.0
        np.testing.assert_allclose(history[f"{stream}_auc_loss"], 1.0 - np.array(history[f"{stream}_auc"]), atol=1e-6)
    if mode == "matta":
        assert history["distillation_weight"][-1] == 1.0  # 2 epochs of 15 steps pass the ramp's end (25)
        assert 0.0 <= history["churn"][-1] <= 1.0
