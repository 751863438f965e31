"""A/B tests of model sizes: deterministic assignment, exposure logs, and analysis of logged outcomes.

- **Assignment**: a user's arm is a pure function of the test's salt and the user id:
  `u = first 8 bytes of sha256(f"{salt}:{user_id}")` read as an unsigned integer over 2**64, a
  number in [0, 1), and the arm is the one whose cumulative traffic share first exceeds `u`. It is
  the same in every process, machine and Python version (Python's `hash` is salted per process and
  is not used), and a new salt re-randomizes users for a new test.
- **Serving**: each arm names a TF Serving version label (`control`, `treatment`), so
  `predict_for_user` asks the server for that label and logs an *exposure* (user, arm, model
  version, prediction) to a JSON-lines file.
- **Analysis** of exposures joined with outcomes (`analyze_ab_test`), per arm and for each arm
  against the control:
  - AUROC of the predictions with DeLong's variance (fast midrank form, Sun & Xu 2014) for its
    confidence interval and for the two-sided z-test of the difference between arms (the arms are
    independent samples, so the variances add);
  - log loss: mean per exposure, a t confidence interval, and Welch's t-test for the difference
    (`scipy.stats.ttest_ind(equal_var=False)`);
  - positive rate of the outcomes: Wilson intervals (`scipy.stats.binomtest`), and the
    two-proportion test as a chi-square test of the 2x2 table without continuity correction
    (`scipy.stats.chi2_contingency`), which is the two-proportion z-test;
  - relative differences (treatment / control - 1) with delta-method intervals;
  - a sample-ratio-mismatch check: chi-square goodness of fit of users per arm against the
    configured shares (`scipy.stats.chisquare`); a failed check means the assignment or the logging
    is broken and the comparisons should not be trusted.
  Exposures are treated as independent; with many exposures per user, intervals are too narrow
  (analyze one exposure per user, or aggregate per user first).
- **Report**: `write_ab_report` writes a markdown report and a PNG plot.

Example:

```python
from matta_tf.serving import raw_features

test = ABTest.from_shares("size-test-1", {"control": 0.5, "treatment": 0.5})
with ExposureLog("runs/ab/exposures.jsonl") as log:
    for user_id in range(24):                      # one request of 4 events per user
        events = records[(user_id % 8) * 4:][:4]   # this user's events (serialized tf.Example)
        inputs = raw_features(events, schema)
        prediction = predict_for_user(client, test, user_id, inputs, log)
exposures = read_exposures("runs/ab/exposures.jsonl")   # one row per scored event
# The events' logged outcomes (clicks), keyed like the exposures; simulated here.
outcomes = exposures[["request_id", "example_index"]].assign(
    outcome=np.random.default_rng(0).integers(0, 2, len(exposures)))
frame = exposures.merge(outcomes, on=["request_id", "example_index"])
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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

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
    return pd.read_json(path, lines=True, dtype={"user_id": str})


def predict_for_user(
    client: Any,
    test: ABTest,
    user_id: Any,
    inputs: Mapping[str, Any],
    log: ExposureLog | None = None,
    score: str = "probabilities",
) -> Any:
    """Calls the version label of `user_id`'s arm and logs one exposure per scored example.

    Args:
        client: A `serving.PredictionClient` for the model under test.
        test: The A/B test.
        user_id: The user the request is for.
        inputs: The request's named input tensors (a batch of examples for this user).
        log: Where exposures go. Defaults to none (no logging).
        score: Output whose value is logged as the prediction (binary: its only column).
            Defaults to `"probabilities"`.

    Returns:
        The client's `Prediction`.

    Over REST the response does not carry the model version, so it is looked up with a metadata
    call for the label (prefer gRPC, whose responses carry it).
    """
    arm = test.arm(user_id)
    prediction = client.predict(inputs, label=arm.label)
    if log is not None:
        version = prediction.version
        if version is None:
            version = client.metadata(label=arm.label)["version"]
        values = np.asarray(prediction[score])
        request_id = uuid.uuid4().hex
        for index, value in enumerate(values):
            value = value.reshape(-1)
            log.log(experiment=test.name, user_id=str(user_id), arm=arm.name, model_name=prediction.model_name,
                    model_version=version, request_id=request_id, example_index=index,
                    prediction=float(value[0]) if value.size == 1 else value.tolist())
    return prediction


# ---- statistics ---------------------------------------------------------------------------------------
def auroc_delong(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """AUROC and its DeLong variance (midrank form of Sun & Xu, 2014).

    Args:
        scores: Predictions (higher means more likely positive).
        labels: Outcomes, 0 or 1.

    Returns:
        `(auroc, variance)`; `(nan, nan)` without both positives and negatives.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        return math.nan, math.nan
    overall = stats.rankdata(np.concatenate([positives, negatives]))
    positive_ranks, negative_ranks = overall[:m], overall[m:]
    auc = (positive_ranks.sum() - m * (m + 1) / 2.0) / (m * n)
    # Placement values: the fraction of the other class each example beats (ties count half).
    v10 = (positive_ranks - stats.rankdata(positives)) / n
    v01 = 1.0 - (negative_ranks - stats.rankdata(negatives)) / m
    variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    return float(auc), float(variance)


def log_losses(predictions: np.ndarray, outcomes: np.ndarray, epsilon: float = 1e-7) -> np.ndarray:
    """Per-example binary log loss of probabilities against 0/1 outcomes (clipped to [eps, 1 - eps])."""
    p = np.clip(np.asarray(predictions, np.float64).reshape(-1), epsilon, 1.0 - epsilon)
    y = np.asarray(outcomes, np.float64).reshape(-1)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def _relative(treatment: float, control: float, var_treatment: float, var_control: float,
              z: float) -> tuple[float, float, float]:
    """Relative difference treatment / control - 1 with a delta-method interval (independent arms)."""
    if control == 0 or not np.isfinite(control):
        return math.nan, math.nan, math.nan
    relative = treatment / control - 1.0
    se = math.sqrt(var_treatment / control**2 + treatment**2 * var_control / control**4)
    return relative, relative - z * se, relative + z * se


@dataclasses.dataclass
class ABAnalysis:
    """Results of `analyze_ab_test`.

    Attributes:
        arms: One row per arm: exposures, users, positives, `positive_rate`, `auroc`, `log_loss`,
            each with `_ci_low`/`_ci_high`.
        comparisons: One row per (arm vs control, metric): `control`, `treatment`, `difference` with
            its interval, `relative_difference` with its interval, `p_value`, `significant`, `test`.
        srm: Sample-ratio check: `observed`, `expected` users per arm, `chi2`, `p_value`, `passed`,
            `users_in_several_arms`.
        alpha: Significance level (intervals are `1 - alpha`).
        control: The control arm.
    """

    arms: pd.DataFrame
    comparisons: pd.DataFrame
    srm: dict[str, Any]
    alpha: float
    control: str
    name: str = ""

    def to_markdown(self, plot_path: str | None = None) -> str:
        """A markdown report: sample-ratio check, per-arm metrics, comparisons, method notes."""
        level = f"{100 * (1 - self.alpha):g}%"
        lines = [f"# A/B test report{': ' + self.name if self.name else ''}", ""]
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
                row["arm"], f"{int(row['exposures']):,}", f"{int(row['users']):,}",
                _interval(row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"]),
                _interval(row["log_loss"], row["log_loss_ci_low"], row["log_loss_ci_high"]),
                _interval(row["positive_rate"], row["positive_rate_ci_low"], row["positive_rate_ci_high"]),
            ])
        lines += _markdown_table(["arm", "exposures", "users", "AUROC", "log loss", "positive rate"], rows)
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
        lines += [
            "",
            "## Method",
            "",
            "AUROC: DeLong variance (midranks); the difference between arms is a two-sided z-test with the "
            "arms' variances added. Log loss: mean per exposure, t intervals, Welch's t-test. Positive rate: "
            "Wilson intervals, two-proportion z-test (chi-square of the 2x2 table, no continuity correction). "
            "Relative differences: delta-method intervals. Sample ratio: chi-square goodness of fit of users "
            "per arm. Exposures are assumed independent.",
        ]
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
        figure.suptitle(f"{self.name or 'A/B test'}: {100 * (1 - self.alpha):g}% intervals", fontsize=10)
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
) -> ABAnalysis:
    """Per-arm AUROC, log loss and positive rate with intervals, each arm against the control, and SRM.

    Args:
        exposures: One row per exposure with its arm, predicted probability and 0/1 outcome (and
            the user, for the sample-ratio check by users).
        test: The `ABTest`, or its `{arm: share}`.
        control: The control arm. Defaults to `"control"`.
        alpha: Significance level; intervals are `1 - alpha`. Defaults to 0.05.
        srm_threshold: The sample-ratio check fails below this p-value. Defaults to 0.001.
        arm: Column of arm names. Defaults to `"arm"`.
        prediction: Column of predicted probabilities. Defaults to `"prediction"`.
        outcome: Column of 0/1 outcomes. Defaults to `"outcome"`.
        user: Column of user ids; users are counted for the sample-ratio check (rows if absent).
            Defaults to `"user_id"`.

    Returns:
        An `ABAnalysis`. See the module docstring for the methods.

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
    for column in (arm, prediction, outcome):
        if column not in exposures:
            raise ValueError(f"`exposures` has no column {column!r}. Columns: {list(exposures.columns)}")
    if control not in shares:
        raise ValueError(f"`control`={control!r} is not an arm of the test. Arms: {list(shares)}")
    outcomes = exposures[outcome].to_numpy()
    if not np.isin(outcomes, (0, 1)).all():
        raise ValueError(f"column {outcome!r} must hold 0/1 outcomes; found {sorted(set(outcomes.tolist()))[:5]}")
    predictions = exposures[prediction].to_numpy(np.float64)
    if not ((predictions >= 0) & (predictions <= 1)).all():
        raise ValueError(f"column {prediction!r} must hold probabilities in [0, 1]")
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))

    per_arm: dict[str, dict[str, Any]] = {}
    rows = []
    for arm_name in shares:
        part = exposures[exposures[arm] == arm_name]
        y = part[outcome].to_numpy(np.int64)
        p = part[prediction].to_numpy(np.float64)
        n = len(part)
        positives = int(y.sum())
        auc, auc_var = auroc_delong(p, y)
        losses = log_losses(p, y)
        loss = float(losses.mean()) if n else math.nan
        loss_var = float(losses.var(ddof=1) / n) if n > 1 else math.nan
        if n > 1:
            loss_low, loss_high = stats.t.interval(1.0 - alpha, n - 1, loc=loss, scale=math.sqrt(loss_var))
        else:
            loss_low = loss_high = math.nan
        if n:
            rate_ci = stats.binomtest(positives, n).proportion_ci(1.0 - alpha, method="wilson")
            rate_low, rate_high = rate_ci.low, rate_ci.high
        else:
            rate_low = rate_high = math.nan
        rate = positives / n if n else math.nan
        auc_se = math.sqrt(auc_var) if np.isfinite(auc_var) else math.nan
        per_arm[arm_name] = {"y": y, "losses": losses, "auc": auc, "auc_var": auc_var, "loss": loss,
                             "loss_var": loss_var, "positives": positives, "n": n, "rate": rate}
        rows.append({
            "arm": arm_name, "exposures": n,
            "users": int(part[user].nunique()) if user in part else n, "positives": positives,
            "auroc": auc, "auroc_ci_low": max(0.0, auc - z * auc_se), "auroc_ci_high": min(1.0, auc + z * auc_se),
            "log_loss": loss, "log_loss_ci_low": loss_low, "log_loss_ci_high": loss_high,
            "positive_rate": rate, "positive_rate_ci_low": rate_low, "positive_rate_ci_high": rate_high,
        })
    arms_table = pd.DataFrame(rows)

    comparisons = []
    reference = per_arm[control]
    for arm_name, current in per_arm.items():
        if arm_name == control:
            continue
        comparisons.append(_compare_auroc(arm_name, current, reference, z))
        comparisons.append(_compare_log_loss(arm_name, current, reference, alpha, z))
        comparisons.append(_compare_rates(arm_name, current, reference, z))
    comparison_table = pd.DataFrame(comparisons)
    if not comparison_table.empty:
        comparison_table["significant"] = comparison_table["p_value"] < alpha

    if user in exposures:
        users_per_arm = exposures.groupby(arm)[user].nunique().to_dict()
        several = int((exposures.groupby(user)[arm].nunique() > 1).sum())
    else:
        users_per_arm = exposures.groupby(arm).size().to_dict()
        several = 0
    srm = sample_ratio_check(users_per_arm, shares, srm_threshold)
    srm["users_in_several_arms"] = several
    if several:
        srm["passed"] = False
    return ABAnalysis(arms_table, comparison_table, srm, alpha, control, name)


def _comparison(arm: str, metric: str, control: float, treatment: float, var_control: float,
                var_treatment: float, difference_ci: tuple[float, float], p_value: float, test: str,
                z: float) -> dict[str, Any]:
    relative, relative_low, relative_high = _relative(treatment, control, var_treatment, var_control, z)
    return {
        "arm": arm, "metric": metric, "control": control, "treatment": treatment,
        "difference": treatment - control, "difference_ci_low": difference_ci[0],
        "difference_ci_high": difference_ci[1], "relative_difference": relative, "relative_ci_low": relative_low,
        "relative_ci_high": relative_high, "p_value": float(p_value), "test": test,
    }


def _compare_auroc(arm: str, current: dict, reference: dict, z: float) -> dict[str, Any]:
    difference = current["auc"] - reference["auc"]
    se = math.sqrt(current["auc_var"] + reference["auc_var"])
    if not np.isfinite(se):
        p_value = math.nan
    else:
        p_value = 2.0 * stats.norm.sf(abs(difference) / se) if se > 0 else (0.0 if difference else 1.0)
    return _comparison(arm, "auroc", reference["auc"], current["auc"], reference["auc_var"], current["auc_var"],
                       (difference - z * se, difference + z * se), p_value, "DeLong z-test (independent arms)", z)


def _compare_log_loss(arm: str, current: dict, reference: dict, alpha: float, z: float) -> dict[str, Any]:
    result = stats.ttest_ind(current["losses"], reference["losses"], equal_var=False)
    interval = result.confidence_interval(1.0 - alpha)
    return _comparison(arm, "log_loss", reference["loss"], current["loss"], reference["loss_var"],
                       current["loss_var"], (float(interval.low), float(interval.high)), result.pvalue,
                       "Welch t-test", z)


def _compare_rates(arm: str, current: dict, reference: dict, z: float) -> dict[str, Any]:
    table = [[current["positives"], current["n"] - current["positives"]],
             [reference["positives"], reference["n"] - reference["positives"]]]
    if not current["n"] or not reference["n"]:
        p_value = math.nan
    elif min(sum(column) for column in zip(*table, strict=True)) == 0:
        p_value = 1.0  # no positives (or no negatives) at all: no evidence of a difference
    else:
        p_value = stats.chi2_contingency(table, correction=False).pvalue
    var_current = current["rate"] * (1 - current["rate"]) / current["n"] if current["n"] else math.nan
    var_reference = reference["rate"] * (1 - reference["rate"]) / reference["n"] if reference["n"] else math.nan
    difference = current["rate"] - reference["rate"]
    se = math.sqrt(var_current + var_reference)
    return _comparison(arm, "positive_rate", reference["rate"], current["rate"], var_reference, var_current,
                       (difference - z * se, difference + z * se), p_value, "two-proportion z-test", z)


def write_ab_report(analysis: ABAnalysis, out_dir: str, name: str = "ab_report") -> dict[str, str]:
    """Writes `<out_dir>/<name>.md` (the markdown report) and `<out_dir>/<name>.png` (the plot).

    Returns:
        `{"markdown": path, "plot": path}`.
    """
    os.makedirs(out_dir, exist_ok=True)
    plot = analysis.plot(os.path.join(out_dir, f"{name}.png"))
    markdown = os.path.join(out_dir, f"{name}.md")
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write(analysis.to_markdown(plot_path=os.path.basename(plot)))
    return {"markdown": markdown, "plot": plot}
