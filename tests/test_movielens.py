"""MovieLens events: time split (global or per user) without leakage, earlier-only history, train-only vocabularies."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from matta_tf.data import MovieLensConfig, Schema, build_events, decode_example, movielens_schema, read_records
from matta_tf.data.movielens import load_ratings, prepare_movielens, split_by_user_time
from matta_tf.data.splits import split_by_time


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return load_ratings()


@pytest.fixture(scope="module")
def events(ratings) -> pd.DataFrame:
    return build_events(ratings)


def test_real_data_is_the_full_movielens_set(ratings, events):
    assert len(ratings) == 100_004
    assert ratings["userId"].nunique() == 671 and ratings["movieId"].nunique() == 9_066
    assert len(events) == 100_004


def test_time_split_has_no_leakage(events):
    times = {split: events.loc[events["split"] == split, "timestamp"] for split in ("train", "validation", "test")}
    assert times["train"].max() < times["validation"].min()
    assert times["validation"].max() < times["test"].min()
    fractions = np.array([len(times[s]) for s in times]) / len(events)
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.01)


def test_split_keeps_equal_timestamps_together():
    timestamps = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3, 4])
    splits = split_by_time(timestamps, (0.5, 0.3, 0.2))
    for t in np.unique(timestamps):
        assert len(set(splits[timestamps == t])) == 1


def test_history_features_use_only_strictly_earlier_events(ratings, events):
    # Recompute every feature for a few users by brute force over the raw ratings.
    for user in (1, 15, 547):
        raw = ratings[ratings["userId"] == user]
        mine = events[events["user_id"] == user]
        for _, event in mine.sample(min(40, len(mine)), random_state=0).iterrows():
            earlier = raw[raw["timestamp"] < event["timestamp"]]
            assert event["history_count"] == len(earlier)
            if len(earlier):
                assert event["history_mean_rating"] == pytest.approx(earlier["rating"].mean(), rel=1e-5)
                assert event["history_positive_rate"] == pytest.approx((earlier["rating"] >= 4).mean(), rel=1e-5)
                assert event["days_since_last_event"] == pytest.approx(
                    (event["timestamp"] - earlier["timestamp"].max()) / 86400, rel=1e-5)
                last = earlier.sort_values(["timestamp", "movieId"], kind="stable")["movieId"].tolist()[-10:]
                assert event["history_movie_ids"] == last
            else:
                assert event["history_movie_ids"] == [] and event["days_since_last_event"] == -1


def test_labels_and_context(ratings, events):
    assert ((events["rating"] >= 4).astype(int) == events["label"]).all()
    assert events["hour_of_day"].between(0, 23).all() and events["day_of_week"].between(0, 6).all()
    multiclass = build_events(ratings.head(500), MovieLensConfig(task="multiclass"))
    np.testing.assert_array_equal(multiclass["label"], (multiclass["rating"] * 2 - 1).astype(int))
    strict = build_events(ratings.head(500), MovieLensConfig(label_threshold=4.5))
    assert ((strict["rating"] >= 4.5).astype(int) == strict["label"]).all()


def test_vocabularies_come_from_training_split_only(events):
    train = events[events["split"] == "train"]
    schema = movielens_schema(train)
    users = set(schema.feature("user_id").vocabulary)
    movies = set(schema.feature("movie_id").vocabulary)
    assert users == set(train["user_id"]) and movies == set(train["movie_id"])
    test = events[events["split"] == "test"]
    assert not set(test["user_id"]) <= users  # cold-start users exist and must map to OOV
    assert schema.feature("history_movie_ids").vocabulary == schema.feature("movie_id").vocabulary


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="split_fractions"):
        MovieLensConfig(split_fractions=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="task"):
        MovieLensConfig(task="ranking")


def test_prepare_writes_records_schema_and_summary(tmp_path, ratings):
    subset = ratings[ratings["userId"] <= 30]
    summary = prepare_movielens(str(tmp_path), MovieLensConfig(num_shards=2), ratings=subset, progress=False)
    schema = Schema.load(str(tmp_path))
    counts = {split: len(list(read_records(str(tmp_path / split)))) for split in ("train", "validation", "test")}
    assert sum(counts.values()) == len(subset)
    assert {s: info["events"] for s, info in summary["splits"].items()} == counts
    assert json.load(open(tmp_path / "summary.json"))["splits"]["train"]["events"] == counts["train"]
    record = decode_example(next(read_records(str(tmp_path / "test"))), schema)
    assert set(record) == {f.name for f in schema.features} | {"label"}
    assert os.path.exists(tmp_path / "vocabularies" / "movie_id.txt")
    with pytest.raises(FileExistsError, match="already holds prepared events"):
        prepare_movielens(str(tmp_path), ratings=subset, progress=False)


def test_user_time_split_orders_each_users_events(ratings):
    subset = ratings[ratings["userId"] <= 60]
    events = build_events(subset, MovieLensConfig(split="user_time"))
    order = {"train": 0, "validation": 1, "test": 2}
    for _, user in events.groupby("user_id"):
        # Within a user, a later split never has an earlier (or equal) timestamp than an earlier split.
        by_split = {s: user.loc[user["split"] == s, "timestamp"] for s in order}
        for earlier, later in (("train", "validation"), ("validation", "test"), ("train", "test")):
            if len(by_split[earlier]) and len(by_split[later]):
                assert by_split[earlier].max() < by_split[later].min()
        assert len(by_split["train"]) >= 0.7 * len(user)  # every MovieLens user has >= 20 ratings
        ranks = user["split"].map(order).to_numpy()
        assert (np.diff(ranks[np.argsort(user["timestamp"].to_numpy(), kind="stable")]) >= 0).all()
    fractions = events["split"].value_counts(normalize=True)
    np.testing.assert_allclose([fractions[s] for s in order], [0.8, 0.1, 0.1], atol=0.02)
    # The same events and features as the time split; only the split column differs.
    time_split = build_events(subset)
    pd.testing.assert_frame_equal(events.drop(columns="split"), time_split.drop(columns="split"))


def test_user_time_split_keeps_ties_together_and_has_no_cold_start_users(tmp_path, ratings):
    users = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 5, 5, 6, 7])
    splits = split_by_user_time(users, times, (0.5, 0.25, 0.25))
    assert list(splits[:10]) == ["train"] * 5 + ["validation"] * 3 + ["test"] * 2
    assert list(splits[10:]) == ["train", "train", "validation", "test"]  # the tied pair stays together
    subset = ratings[ratings["userId"] <= 30]
    summary = prepare_movielens(str(tmp_path), MovieLensConfig(split="user_time"), ratings=subset, progress=False)
    assert summary["config"]["split"] == "user_time"
    assert summary["splits"]["test"]["users"] == summary["splits"]["train"]["users"] == 30
    assert summary["splits"]["test"]["cold_start_user_rate"] == 0.0
    with pytest.raises(ValueError, match="`split` must be one of.*Received: split='random'"):
        MovieLensConfig(split="random")
