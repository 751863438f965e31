"""A/B tests: deterministic, balanced assignment; exposure logs; analysis detects planted differences only.

References: `hashlib` for the documented assignment hash, a subprocess with another hash seed for
determinism across processes, `scipy.stats.mannwhitneyu` for AUROC, `scipy.stats.bootstrap` for the
DeLong standard error, `scipy.stats.chisquare` for the sample-ratio check, `scipy.stats.ttest_ind`
(Welch) for log loss with one exposure per user. Analysis with many exposures per user (the unit of
randomization): tests/test_ab_units.py.
"""

import hashlib
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from matta_tf.serving.ab import (
    ABTest,
    Arm,
    ExposureLog,
    analyze_ab_test,
    auroc_delong,
    hash_unit,
    predict_for_user,
    read_exposures,
    sample_ratio_check,
    write_ab_report,
)

USERS = np.arange(100_000)


def test_hash_is_the_documented_sha256_and_stable_across_processes():
    for user in (0, 7, "user-42"):
        digest = hashlib.sha256(f"salt-1:{user}".encode()).digest()
        assert hash_unit("salt-1", user) == int.from_bytes(digest[:8], "big") / 2.0**64
    test = ABTest.from_shares("exp", {"control": 0.5, "treatment": 0.5})
    here = test.assign_many(range(2000)).tolist()
    code = ("from matta_tf.serving.ab import ABTest; import json; t = ABTest.from_shares('exp', {'control': 0.5, "
            "'treatment': 0.5}); print(json.dumps(t.assign_many(range(2000)).tolist()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                            env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(result.stdout) == here
    assert [test.assign(user) for user in range(50)] == here[:50]


@pytest.mark.parametrize("shares", [{"control": 0.5, "treatment": 0.5}, {"control": 0.9, "treatment": 0.1},
                                    {"control": 0.5, "a": 0.3, "b": 0.2}])
def test_assignment_is_balanced_over_100k_users(shares):
    test = ABTest.from_shares("balance-test", shares)
    arms = test.assign_many(USERS)
    observed = {arm: int((arms == arm).sum()) for arm in shares}
    check = sample_ratio_check(observed, shares)
    reference = stats.chisquare([observed[a] for a in shares], [len(USERS) * s for s in shares.values()])
    assert check["p_value"] == pytest.approx(reference.pvalue)
    assert check["passed"] and check["p_value"] > 0.01
    for arm, share in shares.items():  # within 4 standard deviations of the configured share
        assert abs(observed[arm] / len(USERS) - share) < 4 * np.sqrt(share * (1 - share) / len(USERS))


def test_salt_reassigns_users_and_srm_catches_lost_exposures():
    first = ABTest.from_shares("t1", {"control": 0.5, "treatment": 0.5}).assign_many(USERS)
    second = ABTest.from_shares("t2", {"control": 0.5, "treatment": 0.5}).assign_many(USERS)
    assert 0.48 < np.mean(first != second) < 0.52  # independent randomizations per test
    observed = {"control": int((first == "control").sum()), "treatment": int((first == "treatment").sum())}
    observed["treatment"] = int(observed["treatment"] * 0.95)  # 5% of one arm's exposures lost
    check = sample_ratio_check(observed, {"control": 0.5, "treatment": 0.5})
    assert not check["passed"] and check["p_value"] < 1e-6


def test_traffic_shares_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        ABTest.from_shares("t", {"control": 0.5, "treatment": 0.6})
    with pytest.raises(ValueError, match="share"):
        ABTest("t", (Arm("control", 1.2), Arm("treatment", -0.2)))
    with pytest.raises(ValueError, match="unique"):
        ABTest("t", (Arm("control", 0.5), Arm("control", 0.5)))
    test = ABTest.from_shares("t", {"control": 0.7, "treatment": 0.3}, labels={"treatment": "canary"})
    assert test.arms[1].label == "canary" and test.arms[0].label == "control" and test.salt == "t"


def test_delong_auroc_matches_mann_whitney_and_bootstrap():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    scores = np.round(labels * 0.8 + rng.normal(size=600), 1)  # rounded: many ties
    auc, variance = auroc_delong(scores, labels)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert auc == pytest.approx(u / (labels.sum() * (1 - labels).sum()))

    def statistic(s, y):
        return auroc_delong(s, y)[0]

    boot = stats.bootstrap((scores, labels), statistic, paired=True, vectorized=False, n_resamples=1500,
                           method="percentile", random_state=1)
    assert np.sqrt(variance) == pytest.approx(boot.standard_error, rel=0.12)
    assert np.isnan(auroc_delong(scores, np.zeros(600))).all()  # undefined without positives


def _simulate(test: ABTest, users: np.ndarray, noise: dict, seed: int) -> pd.DataFrame:
    """One exposure per user: outcome ~ Bernoulli(sigmoid(z)); the prediction sees z through arm-specific noise."""
    rng = np.random.default_rng(seed)
    arms = test.assign_many(users)
    z = rng.normal(-0.5, 1.5, len(users))
    outcome = (rng.random(len(users)) < 1 / (1 + np.exp(-z))).astype(int)
    sd = np.array([noise[arm] for arm in arms])
    prediction = 1 / (1 + np.exp(-(z + rng.normal(size=len(users)) * sd)))
    return pd.DataFrame({"user_id": users.astype(str), "arm": arms, "prediction": prediction, "outcome": outcome})


def test_planted_difference_is_detected():
    test = ABTest.from_shares("planted", {"control": 0.5, "treatment": 0.5})
    frame = _simulate(test, np.arange(20_000), {"control": 0.5, "treatment": 0.9}, seed=0)
    analysis = analyze_ab_test(frame, test)
    comparisons = analysis.comparisons.set_index("metric")
    assert comparisons.loc["auroc", "p_value"] < 0.01 and comparisons.loc["auroc", "difference"] < 0
    assert comparisons.loc["auroc", "difference_ci_high"] < 0 and comparisons.loc["auroc", "relative_ci_high"] < 0
    assert comparisons.loc["log_loss", "p_value"] < 0.01 and comparisons.loc["log_loss", "difference"] > 0
    assert comparisons.loc["positive_rate", "p_value"] > 0.01  # the outcomes themselves do not differ
    assert analysis.srm["passed"]
    arms = analysis.arms.set_index("arm")
    for arm in ("control", "treatment"):  # per-arm values agree with independent computations
        part = frame[frame["arm"] == arm]
        u = stats.mannwhitneyu(part["prediction"][part["outcome"] == 1], part["prediction"][part["outcome"] == 0])
        pairs = part["outcome"].sum() * (1 - part["outcome"]).sum()
        assert arms.loc[arm, "auroc"] == pytest.approx(u.statistic / pairs)
        assert arms.loc[arm, "positive_rate_ci_low"] < part["outcome"].mean() < arms.loc[arm, "positive_rate_ci_high"]
    welch = stats.ttest_ind(*(
        -(f["outcome"] * np.log(f["prediction"]) + (1 - f["outcome"]) * np.log(1 - f["prediction"]))
        for f in (frame[frame["arm"] == "treatment"], frame[frame["arm"] == "control"])), equal_var=False)
    assert comparisons.loc["log_loss", "p_value"] == pytest.approx(welch.pvalue, rel=1e-6)


def test_aa_test_is_not_detected_and_false_positive_rate_is_near_alpha():
    test = ABTest.from_shares("aa", {"control": 0.5, "treatment": 0.5})
    noise = {"control": 0.8, "treatment": 0.8}
    analysis = analyze_ab_test(_simulate(test, np.arange(20_000), noise, seed=0), test)
    assert (analysis.comparisons["p_value"] > 0.01).all()
    rejections = {"auroc": 0, "log_loss": 0, "positive_rate": 0}
    for seed in range(100):
        trial = ABTest.from_shares(f"aa-{seed}", {"control": 0.5, "treatment": 0.5})
        comparisons = analyze_ab_test(_simulate(trial, np.arange(500), noise, seed=seed + 1), trial).comparisons
        for metric, p_value in zip(comparisons["metric"], comparisons["p_value"], strict=True):
            rejections[metric] += p_value < 0.05
    for metric, count in rejections.items():  # Binomial(100, 0.05): P(0) = 0.006, P(>= 13) = 0.001
        assert 1 <= count <= 12, (metric, count)


def test_report_and_plot(tmp_path):
    test = ABTest.from_shares("report", {"control": 0.5, "treatment": 0.5})
    analysis = analyze_ab_test(_simulate(test, np.arange(4_000), {"control": 0.3, "treatment": 1.0}, 0), test)
    paths = write_ab_report(analysis, str(tmp_path))
    text = open(paths["markdown"], encoding="utf-8").read()
    for needle in ("Sample ratio", "| control |", "| treatment |", "auroc", "log_loss", "positive_rate", "report.png",
                   "Unit of analysis: **user** (`user_id`): 4,000 users with 4,000 exposures", "delta-method",
                   "DeLong placement values summed per user", "not treated as independent"):
        assert needle in text.replace("ab_report.png", "report.png"), needle
    assert not [name for name in os.listdir(tmp_path) if "tmp" in name]  # written to temporary files, renamed
    image = matplotlib.image.imread(paths["plot"])
    assert image.ndim == 3 and image.shape[0] > 100


def test_analysis_input_checks_and_mixed_users():
    test = ABTest.from_shares("t", {"control": 0.5, "treatment": 0.5})
    frame = _simulate(test, np.arange(400), {"control": 0.5, "treatment": 0.5}, 0)
    with pytest.raises(ValueError, match="outcome"):
        analyze_ab_test(frame.drop(columns="outcome"), test)
    with pytest.raises(ValueError, match="0/1"):
        analyze_ab_test(frame.assign(outcome=frame["outcome"] * 2), test)
    with pytest.raises(ValueError, match="control"):
        analyze_ab_test(frame, test, control="baseline")
    broken = frame.copy()
    broken.loc[broken.index[:5], "arm"] = np.where(broken["arm"][:5] == "control", "treatment", "control")
    broken = pd.concat([broken, frame.iloc[:5]])  # five users seen in both arms
    analysis = analyze_ab_test(broken, test)
    assert analysis.srm["users_in_several_arms"] == 5 and not analysis.srm["passed"]


class _FakePrediction:
    def __init__(self, values, version):
        self.outputs, self.version, self.model_name = {"probabilities": values}, version, "relevance"

    def __getitem__(self, name):
        return self.outputs[name]


class _FakeClient:
    """Answers like `PredictionClient`: gRPC-style (version in the reply) or REST-style (metadata call)."""

    def __init__(self, versions, reports_version):
        self.versions, self.reports_version, self.calls = versions, reports_version, []

    def predict(self, inputs, label=None):
        self.calls.append(label)
        values = np.full((len(inputs["user_id"]), 1), 0.25 if label == "control" else 0.75, np.float32)
        return _FakePrediction(values, self.versions[label] if self.reports_version else None)

    def metadata(self, label=None):
        return {"version": self.versions[label]}


@pytest.mark.parametrize("reports_version", [True, False])
def test_predict_for_user_routes_by_label_logs_exposures_and_returns_the_ids_to_join_on(tmp_path, reports_version):
    test = ABTest.from_shares("route", {"control": 0.5, "treatment": 0.5})
    client = _FakeClient({"control": 1, "treatment": 3}, reports_version)
    path = str(tmp_path / "exposures.jsonl")
    outcome_rows = []
    with ExposureLog(path) as log:
        for user in range(20):
            served = predict_for_user(client, test, user, {"user_id": np.array([user, user])}, log)
            assert served.arm == test.assign(user) and served.example_indices == (0, 1)
            assert served.prediction["probabilities"].shape == (2, 1)
            clicked = [user % 2, (user // 2) % 2]  # outcomes observed later, one per example
            outcome_rows.append(pd.DataFrame({"request_id": served.request_id,
                                              "example_index": served.example_indices, "outcome": clicked}))
    exposures = read_exposures(path)
    # The module docstring's join, as written there:
    outcomes = pd.concat(outcome_rows)
    frame = read_exposures(path).merge(outcomes, on=["request_id", "example_index"])
    assert len(frame) == 40 and frame["request_id"].nunique() == 20
    for _, row in frame.iterrows():
        user = int(row["user_id"])
        assert row["outcome"] == [user % 2, (user // 2) % 2][row["example_index"]]
    analysis = analyze_ab_test(frame, test)
    assert analysis.arms["exposures"].sum() == 40 and analysis.arms["users"].sum() == 20
    assert len(exposures) == 40 and set(exposures["example_index"]) == {0, 1}
    for _, row in exposures.iterrows():
        arm = test.assign(int(row["user_id"]))
        assert row["arm"] == arm and row["experiment"] == "route"
        assert row["model_version"] == {"control": 1, "treatment": 3}[arm]
        assert row["prediction"] == pytest.approx(0.25 if arm == "control" else 0.75)
    assert client.calls == [test.arm(user).label for user in range(20)]
