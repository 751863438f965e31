"""What a data directory holds: per split, events, users, items, positive rate and cold-start rates.

`describe_events` reads any events that follow the schema format (MovieLens, synthetic or your own),
parsing only the three features it needs. A user (item) is cold in a split when it never occurs in
the training split; the rates are shares of the split's events, the quantity that decides how much
of a split a model scores from history.

Example:

```python
summary = describe_events(data_dir, schema, user_id="user_id", item_id="movie_id", label="label")
summary["splits"]["test"]["cold_start_user_rate"]   # share of test events by users absent from train
```
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from matta_tf.data.schema import Schema, SchemaError
from matta_tf.data.tfrecords import _compression_of, checked_files, list_files

SPLITS = ("train", "validation", "test")


def _id_values(schema: Schema, name: str, role: str, field: str) -> tf.io.FixedLenFeature:
    try:
        feature = schema.feature(name)
    except (KeyError, SchemaError):
        feature = None
    if feature is None or feature.kind not in ("int_id", "string"):
        ids = [f.name for f in schema.features if f.kind in ("int_id", "string")]
        raise SchemaError(f"`{field}` must name a single-valued id feature (int_id or string) of the schema. "
                          f"Received: {field}={name!r}; id features: {ids}")
    if feature.role != role:
        raise SchemaError(f"`{field}` must name a feature of role {role!r}. Received: {field}={name!r} "
                          f"(role {feature.role!r})")
    return tf.io.FixedLenFeature([], tf.string if feature.dtype == "string" else tf.int64)


def describe_events(data_dir: str, schema: Schema, user_id: str, item_id: str, label: str,
                    batch_size: int = 8192) -> dict[str, Any]:
    """Counts, positive rate and cold-start rates of every split folder of `data_dir`.

    Args:
        data_dir: A data directory (`schema.yaml` with `train/`, `validation/`, `test/` folders; absent
            splits are left out).
        schema: Its schema.
        user_id: The user id feature (role `user`, kind `int_id` or `string`).
        item_id: The item id feature (role `item`, kind `int_id` or `string`).
        label: A binary label (an event label's class index, or a probability: >= 0.5 is positive).
        batch_size: Records parsed per batch.

    Returns:
        `{"splits": {split: {"events", "users", "items", "positive_rate", "cold_start_user_rate",
        "cold_start_item_rate"}}}`, rates rounded to 4 decimals (cold-start rates are 0 for train).

    Raises:
        SchemaError: a name is not a single-valued id feature of its role, or `label` is not a binary
            label of the schema.
    """
    spec = {user_id: _id_values(schema, user_id, "user", "user_id"),
            item_id: _id_values(schema, item_id, "item", "item_id")}
    label_entry = next((lab for lab in schema.labels if lab.name == label), None)
    if label_entry is None or label_entry.task != "binary":
        raise SchemaError(f"`label` must name a binary label of the schema. Received: label={label!r}; labels: "
                          f"{[(lab.name, lab.task) for lab in schema.labels]}")
    spec[label] = (tf.io.FixedLenFeature([], tf.int64) if label_entry.representation == "class_index"
                   else tf.io.FixedLenFeature([label_entry.width], tf.float32))
    summary: dict[str, Any] = {"splits": {}}
    seen_users: set = set()
    seen_items: set = set()
    for split in SPLITS:
        directory = os.path.join(data_dir, split)
        if not os.path.isdir(directory):
            continue
        users, items, labels = [], [], []
        files = checked_files(list_files(directory))
        dataset = tf.data.TFRecordDataset(files, compression_type=_compression_of(files[0])).batch(batch_size)
        for parsed in dataset.map(lambda records: tf.io.parse_example(records, spec)):
            users.append(parsed[user_id].numpy())
            items.append(parsed[item_id].numpy())
            labels.append(parsed[label].numpy().reshape(len(parsed[user_id]), -1)[:, -1])
        user = np.concatenate(users) if users else np.array([])
        item = np.concatenate(items) if items else np.array([])
        positive = np.concatenate(labels) >= 0.5 if labels else np.array([], bool)
        if split == "train":
            seen_users, seen_items = set(user.tolist()), set(item.tolist())

        def rate(values: np.ndarray) -> float:
            return round(float(values.mean()), 4) if len(values) else 0.0

        summary["splits"][split] = {
            "events": int(len(user)),
            "users": int(len(set(user.tolist()))),
            "items": int(len(set(item.tolist()))),
            "positive_rate": rate(positive),
            "cold_start_user_rate": rate(np.array([u not in seen_users for u in user.tolist()])),
            "cold_start_item_rate": rate(np.array([i not in seen_items for i in item.tolist()])),
        }
    return summary
