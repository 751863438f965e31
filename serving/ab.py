"""A/B tests of model sizes: deterministic assignment, exposure logs, and analysis at the randomization unit.

- **Assignment**: a user's arm is a pure function of the test's salt and the user id:
  `u = first 8 bytes of sha256(f"{salt}:{user_id}")` read as an unsigned integer over 2**64, a
  number in [0, 1), and the arm is the one whose cumulative traffic share first exceeds `u`. It is
  the same in every process, machine and Python version (Python's `hash` is salted per process and
  is not used), and a new salt re-randomizes users for a new test.
- **Serving**: each arm names a TF Serving version label (`control`, `treatment`), so
  `predict_for_user` asks the server for that label, logs an *exposure* (user, arm, model version,
  request id, example index, prediction) per scored example to a JSON-lines file, and returns the
  `request_id` and example indices it logged, so outcomes observed later can be keyed by them.
- **Analysis** (`analyze_ab_test`) is at the **user**, the unit of randomization. One user's
  exposures are correlated (one person's taste and base rate), so a test that treats exposures as
  independent samples has intervals that are too narrow and finds differences that do not exist: on
  `make demo`'s replay (81 users, ~5,000 exposures, outcomes that the arm cannot change) it marked
  a +13% positive-rate difference significant at p = 2.6e-5. Exposures are first summed per user
  (`aggregate_by_user`: exposures, positives, summed log loss), and every variance is over users:
  - positive rate and log loss per exposure are ratio metrics (sum over the arm's users over the
    sum of their exposures): delta-method variance over users, Welch t-test, t intervals, relative
    differences with log-scale delta intervals, all from tea-tasting's `RatioOfMeans` (Deng,
    Knoblich & Lu, 2018);
  - CUPED (Deng, Xu, Kohavi & Walker, 2013) when `pre_period` exposures are given: each user's
    pre-period positives (and log loss) per exposure is the ratio covariate, again `RatioOfMeans`;
  - AUROC pools an arm's exposures, so it is not a function of per-user sums, which is all that
    tea-tasting's metrics see (its `Bootstrap` resamples rows of a per-unit table): this module
    keeps its own code for it. The variance is DeLong's with the placement values summed per user,
    the cluster-robust form of Obuchowski (1997), which is the closed form of a bootstrap of whole
    users (`auroc_cluster_bootstrap`, also available as `auroc_method="bootstrap"`); the difference
    between arms is a z-test with the arms' variances added (the arms hold different users);
  - a sample-ratio-mismatch check: chi-square goodness of fit of users per arm against the
    configured shares (`scipy.stats.chisquare`, over all arms at once; tea-tasting's `SampleRatio`
    compares two arms at a time); a user seen in several arms fails it too, and a failed check means
    the assignment or the logging is broken and the comparisons should not be trusted.
- **Planning** (`plan_ab_test`): from pilot exposures, the users per arm needed to detect a
  relative effect, the minimum detectable effect for a number of users, or the power, by the same
  per-user variances (tea-tasting's power analysis for the ratio metrics).
- **Report**: `write_ab_report` writes a markdown report (stating the unit and the methods) and a
  PNG plot.

Example:

```python
from matta_tf.serving import raw_features

test = ABTest.from_shares("size-test-1", {"control": 0.5, "treatment": 0.5})
outcomes = []
with ExposureLog("runs/ab/exposures.jsonl") as log:
    for user_id in range(24):                      # one request of 4 events per user
        events = records[(user_id % 8) * 4:][:4]   # this user's events (serialized tf.Example)
        served = predict_for_user(client, test, user_id, raw_features(events, schema), log)
        clicked = np.random.default_rng(user_id).integers(0, 2, len(served.example_indices))  # observed later
        outcomes.append(pd.DataFrame({"request_id": served.request_id, "example_index": served.example_indices,
                                      "outcome": clicked}))
frame = read_exposures("runs/ab/exposures.jsonl").merge(pd.concat(outcomes), on=["request_id", "example_index"])
analysis = analyze_ab_test(frame, test)
write_ab_report(analysis, "runs/ab")
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

SHARE_TOLERANCE = 1e-9


# ---- assignment -------------------------------------------------------------------------------------
def hash_unit(salt: str, user_id: Any) -> float:
    """A number in [0, 1) from sha256 of `f"{salt}:{user_id}"`: deterministic across processes."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of an A/B test.

    Args:
        name: Arm name, e.g. `"control"`.
        share: Fraction of users in this arm, in (0, 1].
        label: TF Serving version label the arm calls. Defaults to `name`.
    """

    name: str
    share: float
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an arm needs a non-empty `name`. Received: name={self.name!r}")
        if not 0.0 < float(self.share) <= 1.0:
            raise ValueError(f"arm {self.name!r}: `share` must be in (0, 1]. Received: share={self.share!r}")
        object.__setattr__(self, "share", float(self.share))
        if self.label is None:
            object.__setattr__(self, "label", self.name)


@dataclasses.dataclass(frozen=True)
class ABTest:
    """Arms with traffic shares and the salt that assigns users to them.

    Args:
        name: Test name; written to exposures.
        arms: The arms; shares must sum to 1.
        salt: Hash salt. Defaults to `name`, so each test randomizes users afresh.

    Example:

    ```python
    test = ABTest.from_shares("size-test-1", {"control": 0.9, "treatment": 0.1})
    arm = test.assign("user-42")    # "control" or "treatment", the same on every machine
    assert arm == test.assign("user-42") and arm in ("control", "treatment")
    ```
    """

    name: str
    arms: tuple[Arm, ...]
    salt: str | None = None

    def __post_init__(self) -> None:
        arms = tuple(self.arms)
        if not arms:
            raise ValueError("`arms` is empty: an A/B test needs at least one arm")
        names = [arm.name for arm in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique. Received: arms={names}")
        total = sum(arm.share for arm in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(
                f"traffic shares must sum to 1. Received: shares={ {a.name: a.share for a in arms} } (sum {total!r})"
            )
        object.__setattr__(self, "arms", arms)
        if self.salt is None:
            object.__setattr__(self, "salt", self.name)
        self._edges()  # validates

    @classmethod
    def from_shares(
        cls, name: str, shares: Mapping[str, float], salt: str | None = None, labels: Mapping[str, str] | None = None
    ) -> ABTest:
        """An A/B test from `{arm: share}`, each arm calling the version label of its name (or `labels[arm]`)."""
        labels = labels or {}
        return cls(name, tuple(Arm(arm, share, labels.get(arm)) for arm, share in shares.items()), salt)

    @property
    def shares(self) -> dict[str, float]:
        return {arm.name: arm.share for arm in self.arms}

    def _edges(self) -> np.ndarray:
        edges = np.cumsum([arm.share for arm in self.arms])
        edges[-1] = 1.0  # the last arm takes what rounding leaves
        return edges

    def arm(self, user_id: Any) -> Arm:
        """The arm of `user_id`."""
        index = int(np.searchsorted(self._edges(), hash_unit(self.salt, user_id), side="right"))
        return self.arms[min(index, len(self.arms) - 1)]

    def assign(self, user_id: Any) -> str:
        """The arm name of `user_id`."""
        return self.arm(user_id).name

    def assign_many(self, user_ids: Iterable[Any]) -> np.ndarray:
        """Arm names of many users (an object array)."""
        units = np.fromiter((hash_unit(self.salt, user) for user in user_ids), dtype=np.float64)
        indices = np.minimum(np.searchsorted(self._edges(), units, side="right"), len(self.arms) - 1)
        return np.array([arm.name for arm in self.arms], dtype=object)[indices]


# ---- exposures ----------------------------------------------------------------------------------------
class ExposureLog:
    """Appends exposures (one JSON object per line) to a file; safe to share between threads.

    Each line has `experiment`, `user_id`, `arm`, `model_name`, `model_version`, `request_id`,
    `example_index`, `prediction` and `timestamp` (seconds since 1970).

    Args:
        path: JSON-lines file, appended to.
    """

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def log(self, **exposure: Any) -> None:
        """Writes one exposure (keyword fields as listed in the class docstring)."""
        exposure.setdefault("timestamp", time.time())
        line = json.dumps(exposure, default=_json_default) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> ExposureLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot log a value of type {type(value).__name__}")


def read_exposures(path: str) -> pd.DataFrame:
    """The exposures of a JSON-lines log as a DataFrame (one row per exposure)."""
    return pd.read_json(path, lines=True, dtype={"user_id": str, "request_id": str})


@dataclasses.dataclass(frozen=True)
class ServedPrediction:
    """What `predict_for_user` served: the prediction and the ids its exposures were logged under.

    Attributes:
        prediction: The client's `Prediction`.
        arm: The user's arm.
        request_id: The request id written to every exposure of this call.
        example_indices: The `example_index` of each scored example, in the order of the inputs.
    """

    prediction: Any
    arm: str
    request_id: str
    example_indices: tuple[int, ...]


def predict_for_user(
    client: Any,
    test: ABTest,
    user_id: Any,
    inputs: Mapping[str, Any],
    log: ExposureLog | None = None,
    score: str = "probabilities",
    request_id: str | None = None,
) -> ServedPrediction:
    """Calls the version label of `user_id`'s arm and logs one exposure per scored example.

    Args:
        client: A `serving.PredictionClient` for the model under test.
        test: The A/B test.
        user_id: The user the request is for.
        inputs: The request's named input tensors (a batch of examples for this user).
        log: Where exposures go. Defaults to none (no logging).
        score: Output whose value is logged as the prediction (binary: its only column).
            Defaults to `"probabilities"`.
        request_id: Id written to the exposures. Defaults to a new random id (`uuid4().hex`).

    Returns:
        A `ServedPrediction`: the prediction, the arm, and the `request_id` and `example_indices`
        the exposures were logged under, to key the outcomes by.

    Over REST the response does not carry the model version, so it is looked up with a metadata
    call for the label (prefer gRPC, whose responses carry it).

    Example (joining exposures with outcomes observed later):

    ```python
    from matta_tf.serving import raw_features

    test = ABTest.from_shares("size-test-1", {"control": 0.5, "treatment": 0.5})
    with ExposureLog(f"{tmp_dir}/exposures.jsonl") as log:
        served = predict_for_user(client, test, "user-7", raw_features(records[:4], schema), log)
    clicked = [1, 0, 0, 1]                                 # one 0/1 outcome per example, in input order
    outcomes = pd.DataFrame({"request_id": served.request_id, "example_index": served.example_indices,
                             "outcome": clicked})
    frame = read_exposures(log.path).merge(outcomes, on=["request_id", "example_index"])
    assert len(frame) == 4 and set(frame["arm"]) == {served.arm}
    ```
    """
    arm = test.arm(user_id)
    request_id = uuid.uuid4().hex if request_id is None else str(request_id)
    prediction = client.predict(inputs, label=arm.label)
    values = np.asarray(prediction[score])
    if log is not None:
        version = prediction.version
        if version is None:
            version = client.metadata(label=arm.label)["version"]
        for index, value in enumerate(values):
            value = value.reshape(-1)
            log.log(experiment=test.name, user_id=str(user_id), arm=arm.name, model_name=prediction.model_name,
                    model_version=version, request_id=request_id, example_index=index,
                    prediction=float(value[0]) if value.size == 1 else value.tolist())
    return ServedPrediction(prediction, arm.name, request_id, tuple(range(len(values))))


# ---- statistics ---------------------------------------------------------------------------------------
def _tie_groups(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For scores sorted ascending: each score's tie-group number and the last index of every group."""
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    ends = np.r_[np.flatnonzero(new_group)[1:], len(sorted_scores)] - 1
    return np.cumsum(new_group) - 1, ends


def _placements(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """AUROC and the placement values: the fraction of the other class each example beats (ties count half).

    Returns `(auroc, v10, v01, order)`: `v10` for the positives and `v01` for the negatives, each in
    ascending order of score, and `order`, the sorting permutation of the examples.
    """
    order = np.argsort(scores)  # tie order is irrelevant: ties are handled by group
    sorted_labels = labels[order]
    group, ends = _tie_groups(scores[order])
    m = int(sorted_labels.sum())
    n = len(sorted_labels) - m
    negatives_to = np.cumsum(~sorted_labels)[ends]  # negatives up to the end of each tie group
    positives_to = np.cumsum(sorted_labels)[ends]
    negatives_below = np.r_[0, negatives_to[:-1]]
    positives_below = np.r_[0, positives_to[:-1]]
    tied_negatives = negatives_to - negatives_below
    tied_positives = positives_to - positives_below
    g_pos, g_neg = group[sorted_labels], group[~sorted_labels]
    v10 = (negatives_below[g_pos] + 0.5 * tied_negatives[g_pos]) / n
    v01 = (m - positives_to[g_neg] + 0.5 * tied_positives[g_neg]) / m
    return float(v10.mean()), v10, v01, order


def auroc_delong(scores: np.ndarray, labels: np.ndarray, clusters: np.ndarray | None = None) -> tuple[float, float]:
    """AUROC and its DeLong variance (midrank form of Sun & Xu, 2014), cluster-robust when `clusters` is given.

    Without clusters the examples are independent: `var = var(V10) / m + var(V01) / n` over the
    placement values of the m positives and n negatives. With clusters (users), the AUROC's
    linearization `sum_k phi_k`, `phi_k = (V10_k - m_k A) / m + (V01_k - n_k A) / n` with the
    placement values summed within cluster k, gives `var = K / (K - 1) * sum_k phi_k**2` over the K
    clusters (Obuchowski, 1997): the variance of a cluster-level bootstrap, in closed form.

    Args:
        scores: Predictions (higher means more likely positive).
        labels: Outcomes, 0 or 1.
        clusters: Cluster id of each example (the randomization unit, e.g. the user). Defaults to
            none (independent examples).

    Returns:
        `(auroc, variance)`; `(nan, nan)` without both positives and negatives.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    m, n = int(labels.sum()), int((~labels).sum())
    if m == 0 or n == 0:
        return math.nan, math.nan
    if clusters is not None:
        codes, uniques = pd.factorize(np.asarray(clusters).reshape(-1))
        if len(codes) != len(scores):
            raise ValueError(f"`clusters` has {len(codes)} entries for {len(scores)} scores")
    auc, v10, v01, order = _placements(scores, labels)
    if clusters is None:
        variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
        return auc, float(variance)
    k = len(uniques)
    if k < 2:
        return auc, math.nan
    codes, sorted_labels = codes[order], labels[order]
    phi = (np.bincount(codes[sorted_labels], weights=v10 - auc, minlength=k) / m
           + np.bincount(codes[~sorted_labels], weights=v01 - auc, minlength=k) / n)
    return auc, float(k / (k - 1) * np.sum(phi**2))


def auroc_cluster_bootstrap(
    scores: np.ndarray,
    labels: np.ndarray,
    clusters: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """AUROCs of bootstrap resamples of whole clusters (users drawn with replacement, with all their examples).

    Each resample weights every cluster by how often it was drawn; the weighted AUROC (ties count
    half) is computed for a batch of resamples at once from one sort of the scores.

    Args:
        scores: Predictions (higher means more likely positive).
        labels: Outcomes, 0 or 1.
        clusters: Cluster id of each example.
        n_resamples: Number of resamples. Defaults to 1000.
        seed: Seed of the resampling. Defaults to 0.
        batch_size: Resamples computed together (memory is `batch_size` x examples floats). Defaults to 32.

    Returns:
        The `n_resamples` bootstrap AUROCs (their standard deviation is the standard error); NaN
        for a resample without both positives and negatives.
    """
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be at least 1. Received: n_resamples={n_resamples!r}")
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    codes, uniques = pd.factorize(np.asarray(clusters).reshape(-1))
    if not len(scores) == len(labels) == len(codes):
        raise ValueError(f"`scores`, `labels` and `clusters` differ in length: {len(scores)}, {len(labels)}, "
                         f"{len(codes)}")
    order = np.argsort(scores)  # tie order is irrelevant: ties are handled by group
    scores, labels, codes = scores[order], labels[order], codes[order]
    group, ends = _tie_groups(scores)
    rng = np.random.default_rng(seed)
    k = len(uniques)
    results = []
    for first in range(0, n_resamples, batch_size):
        count = min(batch_size, n_resamples - first)
        draws = rng.multinomial(k, np.full(k, 1.0 / k), size=count).astype(np.float64)
        results.append(_weighted_aurocs(labels, group, ends, draws[:, codes]))
    return np.concatenate(results)


def _weighted_aurocs(labels: np.ndarray, group: np.ndarray, ends: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of examples sorted by score, under each row of `weights` (one weight per example; ties count half).

    Args:
        labels: Outcomes (bool), in ascending order of score.
        group: Tie group of each example, from `_tie_groups`.
        ends: Last index of each tie group, from `_tie_groups`.
        weights: `(resamples, examples)` weights.

    Returns:
        One AUROC per row: `sum_{i pos, j neg} w_i w_j [s_i > s_j] (+ half for ties) / (W_pos W_neg)`.
    """
    negative = np.where(labels, 0.0, weights)
    cumulative = np.cumsum(negative, axis=1)[:, ends]  # negative weight up to the end of each tie group
    below = np.concatenate([np.zeros((len(weights), 1)), cumulative[:, :-1]], axis=1)
    beaten = below + 0.5 * (cumulative - below)  # strictly below, plus half of the ties
    positive = np.where(labels, weights, 0.0)
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(positive * beaten[:, group], axis=1) / pairs


def log_losses(predictions: np.ndarray, outcomes: np.ndarray, epsilon: float = 1e-7) -> np.ndarray:
    """Per-example binary log loss of probabilities against 0/1 outcomes (clipped to [eps, 1 - eps])."""
    p = np.clip(np.asarray(predictions, np.float64).reshape(-1), epsilon, 1.0 - epsilon)
    y = np.asarray(outcomes, np.float64).reshape(-1)
    return -np.log(np.where(y > 0.5, p, 1.0 - p))  # one logarithm per example: this runs on every exposure


def _relative(treatment: float, control: float, var_treatment: float, var_control: float,
              z: float) -> tuple[float, float, float]:
    """Relative difference treatment / control - 1 with a delta-method interval (independent arms)."""
    if control == 0 or not np.isfinite(control):
        return math.nan, math.nan, math.nan
    relative = treatment / control - 1.0
    se = math.sqrt(var_treatment / control**2 + treatment**2 * var_control / control**4)
    return relative, relative - z * se, relative + z * se


def _check_exposures(exposures: pd.DataFrame, columns: Sequence[str], outcome: str,
                     prediction: str | None, what: str = "exposures") -> None:
    """Raises a `ValueError` naming the column for a missing column, a non-0/1 outcome or a non-probability."""
    if not isinstance(exposures, pd.DataFrame):
        raise ValueError(f"`{what}` must be a pandas DataFrame. Received: {type(exposures).__name__}")
    for column in columns:
        if column not in exposures:
            raise ValueError(f"`{what}` has no column {column!r}. Columns: {list(exposures.columns)}")
    outcomes = exposures[outcome].to_numpy()
    valid = np.isin(outcomes, (0, 1))
    if not valid.all():
        raise ValueError(f"`{what}` column {outcome!r} must hold 0/1 outcomes; found "
                         f"{sorted({repr(v) for v in outcomes[~valid][:50].tolist()})[:5]}")
    if prediction is not None:
        predictions = pd.to_numeric(exposures[prediction], errors="coerce").to_numpy(np.float64)
        bad = ~((predictions >= 0) & (predictions <= 1))
        if bad.any():
            raise ValueError(f"`{what}` column {prediction!r} must hold probabilities in [0, 1]; found "
                             f"{exposures[prediction].to_numpy()[bad][:5].tolist()} in {int(bad.sum())} rows")


UNIT_COLUMNS = ("exposures", "positives", "log_loss_sum")


def aggregate_by_user(
    exposures: pd.DataFrame,
    arm: str | None = "arm",
    prediction: str | None = "prediction",
    outcome: str = "outcome",
    user: str = "user_id",
) -> pd.DataFrame:
    """Exposures aggregated to the randomization unit: one row per user (per user and arm, if `arm`).

    Args:
        exposures: One row per exposure.
        arm: Column of arm names, or `None` to aggregate per user only (pre-period data). Defaults to `"arm"`.
        prediction: Column of predicted probabilities, or `None` for no `log_loss_sum`. Defaults to `"prediction"`.
        outcome: Column of 0/1 outcomes. Defaults to `"outcome"`.
        user: Column of user ids. Defaults to `"user_id"`.

    Returns:
        A DataFrame with `user` (and `arm`), `exposures`, `positives` and `log_loss_sum` (the sum of
        the user's per-exposure log losses), in order of first appearance.
    """
    return _aggregate(exposures, arm, prediction, outcome, user)[0]


def _aggregate(exposures: pd.DataFrame, arm: str | None, prediction: str | None, outcome: str,
               user: str) -> tuple[pd.DataFrame, np.ndarray]:
    """`aggregate_by_user`'s table and the row of that table (the unit) of every exposure."""
    keys = [user] + ([arm] if arm is not None else [])
    _check_exposures(exposures, keys + ([prediction] if prediction else []) + [outcome], outcome, prediction)
    codes = np.zeros(len(exposures), np.int64)
    for key in keys:  # one integer code per (user, arm) pair
        key_codes, key_values = pd.factorize(exposures[key])
        if (key_codes < 0).any():
            raise ValueError(f"column {key!r} has {int((key_codes < 0).sum())} missing values")
        codes = codes * len(key_values) + key_codes
    unit_codes, _ = pd.factorize(codes)
    running_max = np.maximum.accumulate(unit_codes)  # codes count up in order of first appearance
    first = np.flatnonzero(np.r_[True, running_max[1:] > running_max[:-1]]) if len(unit_codes) else unit_codes
    units = exposures.iloc[first][keys].reset_index(drop=True)
    count = len(units)
    units["exposures"] = np.bincount(unit_codes, minlength=count).astype(np.float64)
    y = exposures[outcome].to_numpy(np.float64)
    units["positives"] = np.bincount(unit_codes, weights=y, minlength=count)
    if prediction is not None:
        losses = log_losses(exposures[prediction].to_numpy(np.float64), y)
        units["log_loss_sum"] = np.bincount(unit_codes, weights=losses, minlength=count)
    return units, unit_codes


_RATIO_METRICS = {"positive_rate": "positives", "log_loss": "log_loss_sum"}
METRICS = ("auroc", "log_loss", "positive_rate")


def _ratio_metric(metric: str, alpha: float, cuped: bool, **power: Any) -> Any:
    import tea_tasting as tt

    numerator = _RATIO_METRICS[metric]
    return tt.RatioOfMeans(numerator, "exposures", f"pre_{numerator}" if cuped else None,
                           "pre_exposures" if cuped else None, confidence_level=1.0 - alpha, alpha=alpha,
                           equal_var=False, use_t=True, alternative="two-sided", **power)


def _read_aggregates(units: pd.DataFrame, group: str | None) -> Any:
    """tea-tasting `Aggregates` (count, means, variances, covariances with ddof 1) of the unit columns.

    The same statistics as `tea_tasting.aggr.read_aggregates`, computed with numpy: its
    dataframe-generic path costs tens of milliseconds per call, too slow for simulation tests.

    Returns:
        One `Aggregates`, or `{group value: Aggregates}` when `group` is given.
    """
    from tea_tasting.aggr import Aggregates

    columns = [c for c in units.columns if c in UNIT_COLUMNS or c.removeprefix("pre_") in UNIT_COLUMNS]

    def aggregate(values: np.ndarray) -> Aggregates:
        count = len(values)
        covariance = np.cov(values, rowvar=False, ddof=1).reshape(len(columns), len(columns)) if count > 1 else (
            np.full((len(columns), len(columns)), math.nan))
        return Aggregates(
            count_=count,
            mean_={c: float(v) for c, v in zip(columns, values.mean(axis=0), strict=True)} if count else {
                c: math.nan for c in columns},
            var_={c: float(covariance[i, i]) for i, c in enumerate(columns)},
            cov_={(a, b): float(covariance[i, j]) for i, a in enumerate(columns) for j, b in enumerate(columns)
                  if i < j},
        )

    values = units[columns].to_numpy(np.float64)
    if group is None:
        return aggregate(values)
    codes, names = pd.factorize(units[group])
    return {name: aggregate(values[codes == index]) for index, name in enumerate(names)}


def _with_pre_period(units: pd.DataFrame, pre_period: pd.DataFrame | None, prediction: str, outcome: str,
                     user: str) -> pd.DataFrame:
    """Adds `pre_<column>` covariates (zero for users without pre-period exposures) for CUPED."""
    if pre_period is None:
        return units
    has_prediction = prediction in pre_period
    pre = aggregate_by_user(pre_period, None, prediction if has_prediction else None, outcome, user)
    pre = pre.rename(columns={c: f"pre_{c}" for c in UNIT_COLUMNS if c in pre})
    # Users are matched by their ids as text: a log read back from JSON holds strings, a table may hold ints.
    pre.index = pre.pop(user).astype(str)
    merged = units.assign(_unit_key=units[user].astype(str)).join(pre, on="_unit_key").drop(columns="_unit_key")
    covariates = [c for c in merged.columns if c.startswith("pre_")]
    merged[covariates] = merged[covariates].fillna(0.0)
    if not has_prediction:  # log loss then has no covariate: a zero one leaves it unadjusted
        merged["pre_log_loss_sum"] = 0.0
    return merged


@dataclasses.dataclass
class ABAnalysis:
    """Results of `analyze_ab_test`.

    Attributes:
        arms: One row per arm: exposures, users, positives, `positive_rate`, `auroc`, `log_loss`,
            each with `_ci_low`/`_ci_high`.
        comparisons: One row per (arm vs control, metric): `control`, `treatment`, `difference` with
            its interval, `relative_difference` with its interval, `p_value`, `significant`, `test`.
            With CUPED, `control` and `treatment` of the ratio metrics are the adjusted means.
        srm: Sample-ratio check: `observed`, `expected` users per arm, `chi2`, `p_value`, `passed`,
            `users_in_several_arms`.
        alpha: Significance level (intervals are `1 - alpha`).
        control: The control arm.
        name: The test's name.
        unit: The randomization unit (the user column) the analysis is at.
        cuped: Whether the ratio metrics were CUPED-adjusted with a pre-period covariate (log loss only
            when the pre-period has predictions; the comparison's `test` says which).
        auroc_method: `"delong"` (user-clustered DeLong variance) or `"bootstrap"` (user-level bootstrap).
    """

    arms: pd.DataFrame
    comparisons: pd.DataFrame
    srm: dict[str, Any]
    alpha: float
    control: str
    name: str = ""
    unit: str = "user_id"
    cuped: bool = False
    auroc_method: str = "delong"

    def method(self) -> str:
        """The unit of analysis and the methods, in words."""
        auroc = ("DeLong placement values summed per user (cluster-robust variance, Obuchowski 1997)"
                 if self.auroc_method == "delong" else "a bootstrap of whole users")
        cuped = (" CUPED: adjusted with each user's pre-period exposures and outcomes (and log loss, when the "
                 "pre-period has predictions) as the covariate." if self.cuped else "")
        return (
            f"Unit of analysis: the user (`{self.unit}`), the unit of randomization. A user's exposures are "
            "correlated, so they are aggregated per user first and every variance is over users; exposures are "
            "not treated as independent samples. Positive rate and log loss are ratio metrics (sum over the "
            "arm's users / their exposures): delta-method variance over users, Welch t-test and t intervals "
            f"(tea-tasting `RatioOfMeans`), relative differences on the log scale.{cuped} AUROC pools the "
            f"arm's exposures; its variance comes from {auroc}; the difference between arms is a two-sided "
            "z-test with the arms' variances added and its relative interval by the delta method. Sample "
            "ratio: chi-square goodness of fit of users per arm."
        )

    def to_markdown(self, plot_path: str | None = None) -> str:
        """A markdown report: unit of analysis, sample-ratio check, per-arm metrics, comparisons, method."""
        level = f"{100 * (1 - self.alpha):g}%"
        lines = [f"# A/B test report{': ' + self.name if self.name else ''}", ""]
        users, exposures = int(self.arms["users"].sum()), int(self.arms["exposures"].sum())
        lines += [f"Unit of analysis: **user** (`{self.unit}`): {users:,} users with {exposures:,} exposures. "
                  "Intervals and p-values are over users, not exposures (see Method).", ""]
        srm = self.srm
        verdict = "passed" if srm["passed"] else "**FAILED: do not trust the comparisons below**"
        lines += [
            "## Sample ratio",
            "",
            f"Users per arm {srm['observed']} against the configured split {srm['expected_shares']}: "
            f"chi-square = {srm['chi2']:.3f}, p = {srm['p_value']:.4g} (threshold {srm['threshold']:g}): {verdict}.",
        ]
        if srm["users_in_several_arms"]:
            lines.append(f"{srm['users_in_several_arms']} users appear in more than one arm: assignment is broken.")
        lines += ["", f"## Arms ({level} intervals)", ""]
        rows = []
        for _, row in self.arms.iterrows():
            rows.append([
                row["arm"], f"{int(row['users']):,}", f"{int(row['exposures']):,}",
                _interval(row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"]),
                _interval(row["log_loss"], row["log_loss_ci_low"], row["log_loss_ci_high"]),
                _interval(row["positive_rate"], row["positive_rate_ci_low"], row["positive_rate_ci_high"]),
            ])
        lines += _markdown_table(["arm", "users", "exposures", "AUROC", "log loss", "positive rate"], rows)
        lines += ["", f"## Against `{self.control}`", ""]
        rows = []
        for _, row in self.comparisons.iterrows():
            rows.append([
                row["arm"], row["metric"], f"{row['control']:.4f}", f"{row['treatment']:.4f}",
                _interval(row["difference"], row["difference_ci_low"], row["difference_ci_high"], signed=True),
                _interval(100 * row["relative_difference"], 100 * row["relative_ci_low"],
                          100 * row["relative_ci_high"], signed=True, digits=2) + " %",
                f"{row['p_value']:.3g}", "yes" if row["significant"] else "no",
            ])
        lines += _markdown_table(
            ["arm", "metric", "control", "arm value", "difference", "relative", "p-value", f"p < {self.alpha:g}"], rows
        )
        if plot_path:
            lines += ["", f"![per-arm metrics]({plot_path})"]
        lines += ["", "## Method", "", self.method()]
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> str:
        """Writes a PNG with each arm's AUROC, log loss and positive rate and their intervals."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = (("auroc", "AUROC"), ("log_loss", "log loss"), ("positive_rate", "positive rate"))
        figure, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        positions = np.arange(len(self.arms))
        for axis, (metric, title) in zip(axes, metrics, strict=True):
            values = self.arms[metric].to_numpy(float)
            low = values - self.arms[f"{metric}_ci_low"].to_numpy(float)
            high = self.arms[f"{metric}_ci_high"].to_numpy(float) - values
            colors = ["C0" if arm == self.control else "C1" for arm in self.arms["arm"]]
            for position, value, lo, hi, color in zip(positions, values, low, high, colors, strict=True):
                axis.errorbar(position, value, yerr=[[lo], [hi]], fmt="o", color=color, capsize=6)
            axis.set_xticks(positions, self.arms["arm"].tolist())
            axis.set_xlim(-0.6, len(positions) - 0.4)
            axis.set_title(title)
            axis.grid(alpha=0.3)
        figure.suptitle(f"{self.name or 'A/B test'}: {100 * (1 - self.alpha):g}% intervals over users",
                        fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


def _interval(value: float, low: float, high: float, signed: bool = False, digits: int = 4) -> str:
    if not np.isfinite(value):
        return "n/a"
    sign = "+" if signed else ""
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def sample_ratio_check(
    users_per_arm: Mapping[str, int], shares: Mapping[str, float], threshold: float = 0.001
) -> dict[str, Any]:
    """Chi-square goodness of fit of users per arm against the configured traffic shares.

    Args:
        users_per_arm: Observed users per arm.
        shares: Configured share per arm (summing to 1).
        threshold: The check fails when the p-value is below this. Defaults to 0.001.

    Returns:
        `{"observed", "expected", "expected_shares", "chi2", "p_value", "passed", "threshold"}`.

    Raises:
        ValueError: If users were counted in an arm that `shares` does not have.
    """
    arms = list(shares)
    unknown = sorted(set(users_per_arm) - set(arms))
    if unknown:
        raise ValueError(f"users were logged in arms that the test does not have: {unknown}. Arms: {arms}")
    observed = np.array([int(users_per_arm.get(arm, 0)) for arm in arms], np.float64)
    expected = observed.sum() * np.array([shares[arm] for arm in arms], np.float64)
    if len(arms) < 2 or observed.sum() == 0:
        chi2, p_value = 0.0, 1.0
    else:
        chi2, p_value = stats.chisquare(observed, f_exp=expected)
    return {
        "observed": {arm: int(count) for arm, count in zip(arms, observed, strict=True)},
        "expected": {arm: float(count) for arm, count in zip(arms, expected, strict=True)},
        "expected_shares": dict(shares),
        "chi2": float(chi2),
        "p_value": float(p_value),
        "passed": bool(p_value >= threshold),
        "threshold": threshold,
    }


def analyze_ab_test(
    exposures: pd.DataFrame,
    test: ABTest | Mapping[str, float],
    control: str = "control",
    alpha: float = 0.05,
    srm_threshold: float = 0.001,
    arm: str = "arm",
    prediction: str = "prediction",
    outcome: str = "outcome",
    user: str = "user_id",
    pre_period: pd.DataFrame | None = None,
    auroc_method: str = "delong",
    bootstrap_resamples: int = 1000,
    seed: int = 0,
) -> ABAnalysis:
    """Per-arm AUROC, log loss and positive rate with intervals, each arm against the control, and SRM, over users.

    The user is the unit of analysis (the unit of randomization): see the module docstring.

    Args:
        exposures: One row per exposure with its user, arm, predicted probability and 0/1 outcome.
        test: The `ABTest`, or its `{arm: share}`.
        control: The control arm. Defaults to `"control"`.
        alpha: Significance level; intervals are `1 - alpha`. Defaults to 0.05.
        srm_threshold: The sample-ratio check fails below this p-value. Defaults to 0.001.
        arm: Column of arm names. Defaults to `"arm"`.
        prediction: Column of predicted probabilities. Defaults to `"prediction"`.
        outcome: Column of 0/1 outcomes. Defaults to `"outcome"`.
        user: Column of user ids, the randomization unit. Defaults to `"user_id"`.
        pre_period: Exposures of the same users from before the test (columns `user` and `outcome`,
            and `prediction` to adjust log loss too), for CUPED. Defaults to none (no adjustment).
        auroc_method: `"delong"` (user-clustered DeLong variance, closed form) or `"bootstrap"`
            (standard error of a bootstrap of whole users). Defaults to `"delong"`.
        bootstrap_resamples: Resamples for `auroc_method="bootstrap"`. Defaults to 1000.
        seed: Seed for `auroc_method="bootstrap"`. Defaults to 0.

    Returns:
        An `ABAnalysis`.

    Raises:
        ValueError: For a missing column, an outcome other than 0/1, a prediction outside [0, 1],
            an unknown control or `auroc_method`, or an `alpha` outside (0, 1).

    Example:

    ```python
    rng = np.random.default_rng(0)
    exposures = pd.DataFrame({"arm": rng.choice(["control", "treatment"], 400), "user_id": np.arange(400),
                              "prediction": rng.uniform(size=400), "outcome": rng.integers(0, 2, 400)})
    analysis = analyze_ab_test(exposures, ABTest.from_shares("t", {"control": 0.5, "treatment": 0.5}))
    analysis.comparisons[["arm", "metric", "relative_difference", "p_value"]]   # one row per metric
    ```
    """
    shares = test.shares if isinstance(test, ABTest) else dict(test)
    name = test.name if isinstance(test, ABTest) else ""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1). Received: alpha={alpha!r}")
    if control not in shares:
        raise ValueError(f"`control`={control!r} is not an arm of the test. Arms: {list(shares)}")
    if auroc_method not in ("delong", "bootstrap"):
        raise ValueError(f"`auroc_method` must be 'delong' or 'bootstrap'. Received: auroc_method={auroc_method!r}")
    units, unit_codes = _aggregate(exposures, arm, prediction, outcome, user)
    if pre_period is not None:
        _check_exposures(pre_period, [user, outcome], outcome, prediction if prediction in pre_period else None,
                         what="pre_period")
    units = _with_pre_period(units, pre_period, prediction, outcome, user)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    arm_of_unit = units[arm].to_numpy()
    all_outcomes = exposures[outcome].to_numpy(np.int64)
    all_predictions = exposures[prediction].to_numpy(np.float64)
    in_test = units[units[arm].isin(list(shares))]
    # CUPED needs pre-period exposures in every arm (the covariate is a ratio per arm).
    cuped = pre_period is not None and bool((in_test.groupby(arm, observed=True)["pre_exposures"].sum() > 0).all())
    if not cuped:
        in_test = in_test.drop(columns=[c for c in in_test.columns if c.startswith("pre_")])
    aggregates = _read_aggregates(in_test, arm)

    per_arm: dict[str, dict[str, Any]] = {}
    rows = []
    for arm_name in shares:
        in_arm = (arm_of_unit == arm_name)[unit_codes]
        y, p, clusters = all_outcomes[in_arm], all_predictions[in_arm], unit_codes[in_arm]
        arm_users = aggregates[arm_name].count() if arm_name in aggregates else 0
        if auroc_method == "delong":
            auc, auc_var = auroc_delong(p, y, clusters)
        else:
            auc = auroc_delong(p, y)[0]
            draws = auroc_cluster_bootstrap(p, y, clusters, bootstrap_resamples, seed) if len(y) else np.nan
            auc_var = float(np.nanvar(draws, ddof=1)) if np.isfinite(auc) else math.nan
        auc_se = math.sqrt(auc_var) if np.isfinite(auc_var) else math.nan
        row = {"arm": arm_name, "exposures": len(y), "users": arm_users, "positives": int(y.sum()),
               "auroc": auc, "auroc_ci_low": float(np.clip(auc - z * auc_se, 0.0, 1.0)),
               "auroc_ci_high": float(np.clip(auc + z * auc_se, 0.0, 1.0))}  # NaN stays NaN
        for metric, numerator in (("log_loss", "log_loss_sum"), ("positive_rate", "positives")):
            row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = _ratio_interval(
                aggregates.get(arm_name), numerator, alpha)
        per_arm[arm_name] = {"auc": auc, "auc_var": auc_var, "users": arm_users}
        rows.append(row)
    arms_table = pd.DataFrame(rows)

    comparisons = []
    reference = per_arm[control]
    for arm_name, current in per_arm.items():
        if arm_name == control:
            continue
        comparisons.append(_compare_auroc(arm_name, current, reference, z, auroc_method))
        for metric in ("log_loss", "positive_rate"):
            comparisons.append(_compare_ratio(arm_name, metric, aggregates.get(arm_name), aggregates.get(control),
                                              alpha, cuped and (metric == "positive_rate" or prediction in pre_period)))
    comparison_table = pd.DataFrame(comparisons)
    if not comparison_table.empty:
        comparison_table["significant"] = comparison_table["p_value"] < alpha

    users_per_arm = units.groupby(arm, observed=True).size().to_dict()
    several = int((units[user].value_counts() > 1).sum())
    srm = sample_ratio_check(users_per_arm, shares, srm_threshold)
    srm["users_in_several_arms"] = several
    if several:
        srm["passed"] = False
    return ABAnalysis(arms_table, comparison_table, srm, alpha, control, name, user, cuped, auroc_method)


def _ratio_interval(aggregates: Any, numerator: str, alpha: float) -> tuple[float, float, float]:
    """An arm's ratio metric (sum of `numerator` / sum of exposures) with its delta-method t interval over users."""
    if aggregates is None or aggregates.count() == 0 or aggregates.mean("exposures") == 0:
        return math.nan, math.nan, math.nan
    value = aggregates.mean(numerator) / aggregates.mean("exposures")
    users = aggregates.count()
    if users < 2:
        return value, math.nan, math.nan
    se = math.sqrt(max(aggregates.ratio_var(numerator, "exposures"), 0.0) / users)
    half = float(stats.t.ppf(1.0 - alpha / 2.0, users - 1)) * se
    return float(value), float(value - half), float(value + half)


def _comparison(arm: str, metric: str, control: float, treatment: float, difference_ci: tuple[float, float],
                relative: tuple[float, float, float], p_value: float, test: str) -> dict[str, Any]:
    return {
        "arm": arm, "metric": metric, "control": float(control), "treatment": float(treatment),
        "difference": float(treatment - control), "difference_ci_low": float(difference_ci[0]),
        "difference_ci_high": float(difference_ci[1]), "relative_difference": float(relative[0]),
        "relative_ci_low": float(relative[1]), "relative_ci_high": float(relative[2]), "p_value": float(p_value),
        "test": test,
    }


def _compare_auroc(arm: str, current: dict, reference: dict, z: float, method: str) -> dict[str, Any]:
    difference = current["auc"] - reference["auc"]
    se = math.sqrt(current["auc_var"] + reference["auc_var"])
    if not np.isfinite(se):
        p_value = math.nan
    else:
        p_value = 2.0 * stats.norm.sf(abs(difference) / se) if se > 0 else (0.0 if difference else 1.0)
    relative = _relative(current["auc"], reference["auc"], current["auc_var"], reference["auc_var"], z)
    return _comparison(arm, "auroc", reference["auc"], current["auc"], (difference - z * se, difference + z * se),
                       relative, p_value, "z-test, AUROC variance " + (
                           "user-clustered DeLong" if method == "delong" else "by a bootstrap of users"))


def _compare_ratio(arm: str, metric: str, current: Any, reference: Any, alpha: float, cuped: bool) -> dict[str, Any]:
    test = "Welch t-test, delta method over users" + (" (CUPED)" if cuped else "")
    if current is None or reference is None or min(current.count(), reference.count()) < 2:
        nan = (math.nan, math.nan, math.nan)
        return _comparison(arm, metric, math.nan, math.nan, nan[:2], nan, math.nan, test)
    with np.errstate(all="ignore"):
        result = _ratio_metric(metric, alpha, cuped).analyze_aggregates(reference, current)
    p_value = result.pvalue
    if not np.isfinite(p_value) and result.effect_size == 0:
        p_value = 1.0  # no variation at all (e.g. no positives anywhere): no evidence of a difference
    return _comparison(arm, metric, result.control, result.treatment,
                       (result.effect_size_ci_lower, result.effect_size_ci_upper),
                       (result.rel_effect_size, result.rel_effect_size_ci_lower, result.rel_effect_size_ci_upper),
                       p_value, test)


def plan_ab_test(
    pilot: pd.DataFrame,
    metric: str = "positive_rate",
    relative_effect: float | None = None,
    users: int | None = None,
    power: float = 0.8,
    alpha: float = 0.05,
    treatment_share: float = 0.5,
    prediction: str = "prediction",
    outcome: str = "outcome",
    user: str = "user_id",
) -> dict[str, Any]:
    """Power analysis of a planned two-arm test from pilot exposures: users needed, detectable effect, or power.

    Give `relative_effect` to get the users needed for `power`; give `users` to get the minimum
    detectable relative effect at `power`; give both to get the power. The pilot's users (one
    population, e.g. last week's control traffic) give the per-user variance: for ratio metrics the
    delta-method variance over users, with tea-tasting's `RatioOfMeans` power and detectable effect
    (Welch t-test), for AUROC the user-clustered DeLong variance times the pilot's users (a z-test;
    the variance of a pooled AUROC shrinks as one over the users). Users needed: the smallest whole
    number whose power reaches `power` (the returned `power` is the power at that number).

    Args:
        pilot: Pilot exposures (columns `user`, `outcome`, and `prediction` for AUROC and log loss).
        metric: `"positive_rate"`, `"log_loss"` or `"auroc"`. Defaults to `"positive_rate"`.
        relative_effect: Relative difference to detect (treatment / control - 1). Defaults to none.
        users: Users in the control and treatment arms together. Defaults to none.
        power: Power for the users or the effect. Defaults to 0.8.
        alpha: Two-sided significance level. Defaults to 0.05.
        treatment_share: The treatment's share of the two arms' users. Defaults to 0.5.
        prediction: Column of predicted probabilities. Defaults to `"prediction"`.
        outcome: Column of 0/1 outcomes. Defaults to `"outcome"`.
        user: Column of user ids. Defaults to `"user_id"`.

    Returns:
        `{"metric", "baseline", "relative_effect", "effect", "power", "alpha", "users",
        "users_control", "users_treatment"}` (`users` is both arms together).

    Raises:
        ValueError: For an unknown metric, neither `relative_effect` nor `users`, or values out of range.

    Example:

    ```python
    rng = np.random.default_rng(0)                         # last week's exposures: 500 users, 20 each
    rates = rng.beta(2, 8, 500)
    last_week = pd.DataFrame({"user_id": np.repeat(np.arange(500), 20),
                              "outcome": rng.random(10_000) < np.repeat(rates, 20)})
    plan = plan_ab_test(last_week, "positive_rate", relative_effect=0.05)   # users needed for 80% power
    assert plan["power"] >= 0.8 and plan["users"] == plan["users_control"] + plan["users_treatment"]
    ```
    """
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {list(METRICS)}. Received: metric={metric!r}")
    if relative_effect is None and users is None:
        raise ValueError("give `relative_effect` (to solve for users), `users` (to solve for the detectable effect), "
                         "or both (to solve for power)")
    for field, value, low, high in (("power", power, 0.0, 1.0), ("alpha", alpha, 0.0, 1.0),
                                    ("treatment_share", treatment_share, 0.0, 1.0)):
        if not low < value < high:
            raise ValueError(f"`{field}` must be in ({low:g}, {high:g}). Received: {field}={value!r}")
    if relative_effect is not None and (relative_effect == 0 or not np.isfinite(relative_effect)):
        raise ValueError(f"`relative_effect` must be a non-zero number. Received: relative_effect={relative_effect!r}")
    if users is not None and users < 4:
        raise ValueError(f"`users` must be at least 4. Received: users={users!r}")
    needs_prediction = metric != "positive_rate"
    units = aggregate_by_user(pilot, None, prediction if needs_prediction else None, outcome, user)
    if len(units) < 2:
        raise ValueError(f"`pilot` needs at least 2 users; it has {len(units)}")
    if metric == "auroc":
        auc, auc_var = auroc_delong(pilot[prediction].to_numpy(np.float64), pilot[outcome].to_numpy(np.int64),
                                    pilot[user].to_numpy())
        if not np.isfinite(auc_var):
            raise ValueError("`pilot` needs positives and negatives from at least 2 users for an AUROC plan")
        baseline = auc
        power_of, detectable = _auroc_power(auc_var * len(units), auc, alpha, treatment_share, power)
    else:
        aggregates = _read_aggregates(units, None)
        baseline = aggregates.mean(_RATIO_METRICS[metric]) / aggregates.mean("exposures")
        power_of, detectable = _ratio_power(metric, aggregates, alpha, treatment_share, power)
    if users is None:  # the fewest users that reach `power`
        users = _fewest_users(lambda total: power_of(relative_effect, total), power, treatment_share)
        power = power_of(relative_effect, users)
    elif relative_effect is None:
        relative_effect = detectable(users)
    else:
        power = power_of(relative_effect, users)
    users_treatment = int(round(users * treatment_share))
    return {
        "metric": metric, "baseline": float(baseline), "relative_effect": float(relative_effect),
        "effect": float(relative_effect * baseline), "power": float(power), "alpha": alpha, "users": int(users),
        "users_control": int(users) - users_treatment, "users_treatment": users_treatment,
    }


def _ratio_power(metric: str, aggregates: Any, alpha: float, share: float,
                 power: float) -> tuple[Callable[[float, int], float], Callable[[int], float]]:
    """tea-tasting's power and detectable relative effect of a ratio metric, as functions of the users."""
    ratio = share / (1.0 - share)

    def power_of(relative_effect: float, users: int) -> float:
        metric_ = _ratio_metric(metric, alpha, False, ratio=ratio, rel_effect_size=float(relative_effect),
                                n_obs=int(users))
        return float(metric_.solve_power_from_aggregates(aggregates, "power")[0].power)

    def detectable(users: int) -> float:
        metric_ = _ratio_metric(metric, alpha, False, ratio=ratio, power=power, n_obs=int(users))
        return float(metric_.solve_power_from_aggregates(aggregates, "rel_effect_size")[0].rel_effect_size)

    return power_of, detectable


def _auroc_power(unit_var: float, baseline: float, alpha: float, share: float,
                 power: float) -> tuple[Callable[[float, int], float], Callable[[int], float]]:
    """Power and detectable relative effect of the AUROC z-test, with variance `unit_var / users` per arm."""
    critical = float(stats.norm.isf(alpha / 2.0))

    def power_for_effect(effect: float, users: float) -> float:
        se = math.sqrt(unit_var / (users * (1.0 - share)) + unit_var / (users * share))
        return float(stats.norm.sf(critical - abs(effect) / se) + stats.norm.cdf(-critical - abs(effect) / se))

    def power_of(relative_effect: float, users: int) -> float:
        return power_for_effect(relative_effect * baseline, users)

    def detectable(users: int) -> float:
        se = math.sqrt(unit_var / (users * (1.0 - share)) + unit_var / (users * share))
        return float(optimize.brentq(lambda e: power_for_effect(e, users) - power, 0.0, 20.0 * se)) / baseline

    return power_of, detectable


def _fewest_users(power_of: Callable[[int], float], power: float, share: float) -> int:
    """The smallest total of users (both arms) whose power reaches `power`, by integer bisection.

    Own search rather than tea-tasting's `solve_power(..., "n_obs")`: that brackets from 3 users in
    total, which leaves an arm with under one user (and a NaN) for unequal splits.
    """
    low = max(4, math.ceil(2.0 / min(share, 1.0 - share)))  # two users in the smaller arm at least
    if power_of(low) >= power:
        return low
    high = 2 * low
    while power_of(high) < power:
        low, high = high, 2 * high
        if high > 10**12:
            raise ValueError("the effect is too small to detect with any practical number of users")
    while high - low > 1:  # power_of(low) < power <= power_of(high)
        middle = (low + high) // 2
        low, high = (middle, high) if power_of(middle) < power else (low, middle)
    return high


def write_ab_report(analysis: ABAnalysis, out_dir: str, name: str = "ab_report") -> dict[str, str]:
    """Writes `<out_dir>/<name>.md` (the markdown report, with the unit of analysis and the method) and the PNG plot.

    Both are written to temporary files and renamed into place, so a failed write leaves an earlier
    report whole.

    Returns:
        `{"markdown": path, "plot": path}`.
    """
    os.makedirs(out_dir, exist_ok=True)
    plot = os.path.join(out_dir, f"{name}.png")
    temporary_plot = os.path.join(out_dir, f".{name}.tmp.png")
    analysis.plot(temporary_plot)
    os.replace(temporary_plot, plot)
    markdown = os.path.join(out_dir, f"{name}.md")
    temporary = f"{markdown}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(analysis.to_markdown(plot_path=os.path.basename(plot)))
    os.replace(temporary, markdown)
    return {"markdown": markdown, "plot": plot}
