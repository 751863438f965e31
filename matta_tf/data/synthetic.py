"""Synthetic relevance events at scale, with a hidden ground truth that rewards model capacity.

The events have the same shape as the MovieLens ones (user, context and item features of every kind,
a binary event label), in any number: users, items and events are configurable, the output streams to
sharded TFRecords chunk by chunk (memory is bounded by the user/item tables and one chunk), and the
result is a pure function of the seed and the config (chunk `c` draws from its own generator
seeded `(seed, c)`).

Ground truth (hidden): each user u and item i has a latent vector (`latent_dim`), each hour and
device a context vector; the click logit is

    z = bias + b_u + b_i + scale * <p_u, q_i> + <c_hour + c_device, q_i> + v . tanh(A p_u + B q_i)

and the label is Bernoulli(sigmoid(z)). The bilinear term has rank `latent_dim` and the last term is a
random non-linear user-item interaction, so a model with wider embeddings and hidden layers can fit
more of z than a narrow one: there is a real capacity gap for a TA to fill. `true_logit` (metadata)
records z so a run can report the oracle AUROC.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from matta_tf.data.atomic import atomic_write
from matta_tf.data.examples import serialize_example
from matta_tf.data.schema import Feature, Label, Schema
from matta_tf.data.splits import SPLITS, check_split_fractions
from matta_tf.data.tfrecords import ShardedTFRecordWriter

DEVICES = ("android", "ios", "web", "tv")
_PRICE_BOUNDARIES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of a synthetic event set.

    Args:
        num_users: Distinct users. Defaults to 10,000.
        num_items: Distinct items. Defaults to 2,000.
        num_events: Events in all splits together. Defaults to 1,000,000.
        num_categories: Item categories (each item has 1-3). Defaults to 24.
        latent_dim: Rank of the hidden user-item interaction. Defaults to 32.
        interaction_scale: Weight of the bilinear term. Defaults to 2.0.
        nonlinear_units: Hidden units of the random non-linear interaction. Defaults to 64.
        base_logit: Global bias; sets the positive rate. Defaults to -1.0.
        zipf_exponent: Popularity skew of users and items. Defaults to 1.05.
        split_fractions: Fractions of events, in event-time order, for train, validation, test.
        num_shards: TFRecord shards per split. Defaults to 4.
        chunk_size: Events generated and written per step. Defaults to 50,000.
        seed: The seed everything derives from. Defaults to 0.
        teacher_labels: Also write `teacher_probability`, `sigmoid(z)`: the hidden truth acting as a
            large, complex teacher whose soft labels a model distills (the paper's teacher-labelled
            setting without training a teacher first). Defaults to `False`.
    """

    num_users: int = 10_000
    num_items: int = 2_000
    num_events: int = 1_000_000
    num_categories: int = 24
    latent_dim: int = 32
    interaction_scale: float = 2.0
    nonlinear_units: int = 64
    base_logit: float = -1.0
    zipf_exponent: float = 1.05
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_shards: int = 4
    chunk_size: int = 50_000
    seed: int = 0
    teacher_labels: bool = False

    def __post_init__(self) -> None:
        for field in ("num_users", "num_items", "num_events", "num_categories", "latent_dim",
                      "nonlinear_units", "num_shards", "chunk_size"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"`{field}` must be >= 1. Received: {field}={getattr(self, field)!r}")
        object.__setattr__(self, "split_fractions", check_split_fractions(self.split_fractions))


class GroundTruth:
    """The hidden tables and interaction function of a config (a pure function of the seed)."""

    def __init__(self, config: SyntheticConfig):
        rng = np.random.default_rng([config.seed, 0])
        d = config.latent_dim
        self.config = config
        self.user_latent = rng.normal(0, 1 / np.sqrt(d), (config.num_users, d)).astype(np.float32)
        self.item_latent = rng.normal(0, 1 / np.sqrt(d), (config.num_items, d)).astype(np.float32)
        self.user_bias = rng.normal(0, 0.3, config.num_users).astype(np.float32)
        self.item_bias = rng.normal(0, 0.5, config.num_items).astype(np.float32)
        self.hour_context = rng.normal(0, 0.5 / np.sqrt(d), (24, d)).astype(np.float32)
        self.device_context = rng.normal(0, 0.5 / np.sqrt(d), (len(DEVICES), d)).astype(np.float32)
        self.user_projection = rng.normal(0, 1.5, (d, config.nonlinear_units)).astype(np.float32)
        self.item_projection = rng.normal(0, 1.5, (d, config.nonlinear_units)).astype(np.float32)
        self.output_weights = rng.normal(0, 1.0 / np.sqrt(config.nonlinear_units), config.nonlinear_units)
        # Item side information that correlates with the latent vectors, so features are informative.
        category_centers = rng.normal(0, 1, (config.num_categories, d)).astype(np.float32)
        affinity = self.item_latent @ category_centers.T
        counts = rng.integers(1, 4, config.num_items)
        self.item_categories = [np.argsort(-affinity[i])[: counts[i]].tolist() for i in range(config.num_items)]
        self.item_price = np.round(np.exp(rng.normal(1.5, 1.0, config.num_items)), 2).astype(np.float32)
        self.user_weights = _zipf_weights(config.num_users, config.zipf_exponent, rng)
        self.item_weights = _zipf_weights(config.num_items, config.zipf_exponent, rng)

    def logits(self, users: np.ndarray, items: np.ndarray, hours: np.ndarray, devices: np.ndarray) -> np.ndarray:
        p, q = self.user_latent[users], self.item_latent[items]
        context = self.hour_context[hours] + self.device_context[devices]
        hidden = np.tanh(p @ self.user_projection + q @ self.item_projection)
        return (
            self.config.base_logit
            + self.user_bias[users]
            + self.item_bias[items]
            + self.config.interaction_scale * np.einsum("nd,nd->n", p, q)
            + np.einsum("nd,nd->n", context, q)
            + hidden @ self.output_weights
        ).astype(np.float32)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(weights / weights.sum())


def synthetic_schema(config: SyntheticConfig) -> Schema:
    """The schema of synthetic events (vocabularies are the full id ranges; all ids are known)."""
    return Schema(
        features=(
            Feature("user_id", "user", "int_id", vocabulary=tuple(range(config.num_users))),
            Feature("hour_of_day", "context", "int_id", vocabulary=tuple(range(24))),
            Feature("day_of_week", "context", "int_id", vocabulary=tuple(range(7))),
            Feature("device", "context", "string", vocabulary=DEVICES),
            Feature("item_id", "item", "int_id", vocabulary=tuple(range(config.num_items))),
            Feature("item_categories", "item", "multi_categorical", dtype="int64",
                    vocabulary=tuple(range(config.num_categories))),
            Feature("item_price", "item", "numeric", boundaries=_PRICE_BOUNDARIES),
            Feature("event_index", "metadata", "int_id", description="position in event time"),
            Feature("true_logit", "metadata", "numeric", description="hidden ground-truth logit"),
        ),
        labels=(Label("label", "event", "binary", description="Bernoulli(sigmoid(true_logit))"),)
        + ((Label("teacher_probability", "teacher", "binary", description="sigmoid(true_logit)"),)
           if config.teacher_labels else ()),
        name="synthetic",
        description=f"synthetic relevance events, {dataclasses.asdict(config)}",
    )


def generate_chunk(truth: GroundTruth, chunk_index: int, start: int, size: int) -> dict[str, np.ndarray]:
    """Events `start .. start+size-1` as columns; depends only on the config and `chunk_index`."""
    config = truth.config
    rng = np.random.default_rng([config.seed, 1, chunk_index])
    users = rng.choice(config.num_users, size, p=truth.user_weights)
    items = rng.choice(config.num_items, size, p=truth.item_weights)
    hours = rng.integers(0, 24, size)
    devices = rng.integers(0, len(DEVICES), size)
    logits = truth.logits(users, items, hours, devices)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = (rng.random(size) < probabilities).astype(np.int64)
    teacher = {"teacher_probability": probabilities.astype(np.float32)} if config.teacher_labels else {}
    return {
        "user_id": users,
        "hour_of_day": hours,
        "day_of_week": rng.integers(0, 7, size),
        "device": np.asarray(DEVICES)[devices],
        "item_id": items,
        "item_categories": [truth.item_categories[i] for i in items],
        "item_price": truth.item_price[items],
        "event_index": np.arange(start, start + size),
        "true_logit": logits,
        "label": labels,
        **teacher,
    }


def _rows(columns: dict) -> Iterator[dict]:
    names = list(columns)
    for values in zip(*(columns[n] for n in names), strict=True):
        yield dict(zip(names, values, strict=True))


def generate_synthetic(out_dir: str, config: SyntheticConfig = SyntheticConfig(), progress: bool = True) -> dict:
    """Streams synthetic events to `<out_dir>/<split>/part-*.tfrecord` with `schema.yaml` and a summary.

    Chunk `c` goes to shard `c % num_shards` of its split, so the files are the same for the same
    config whatever the machine. Returns the summary (counts and positive rate per split).
    """
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        raise FileExistsError(f"{out_dir} already holds generated events (summary.json); choose another --out")
    truth = GroundTruth(config)
    schema = synthetic_schema(config)
    bounds = np.cumsum([0, *(round(f * config.num_events) for f in config.split_fractions[:2])]).tolist()
    bounds.append(config.num_events)
    summary: dict = {"source": "synthetic", "config": dataclasses.asdict(config), "splits": {}}
    bar = tqdm(total=config.num_events, desc="generating events", unit="ev", disable=not progress)
    chunk_index = 0
    for split, (begin, end) in zip(SPLITS, zip(bounds[:-1], bounds[1:], strict=True), strict=True):
        positives = 0
        with ShardedTFRecordWriter(os.path.join(out_dir, split, "part"), config.num_shards) as writer:
            for start in range(begin, end, config.chunk_size):
                size = min(config.chunk_size, end - start)
                columns = generate_chunk(truth, chunk_index, start, size)
                shard = chunk_index % config.num_shards
                for record in _rows(columns):
                    writer.write(serialize_example(record, schema), shard=shard)
                positives += int(columns["label"].sum())
                chunk_index += 1
                bar.update(size)
        summary["splits"][split] = {
            "events": end - begin,
            "positive_rate": round(positives / max(end - begin, 1), 4),
            "files": writer.paths,
        }
    bar.close()
    schema.save(out_dir)
    atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))  # the done marker, last
    return summary
