"""A/B analysis at the randomization unit (issue 17): calibrated under A/A with correlated exposures, well powered.

References: the exposure-level analysis that `analyze_ab_test` used before (two-proportion z-test,
Welch's t-test over exposures, DeLong's independent-sample variance) kept here only to show it fails;
a numpy delta-method and CUPED formula for tea-tasting's results; a loop over user resamples with
`scipy.stats.mannwhitneyu` for the vectorized user bootstrap; the normal-approximation sample-size
formula for the power calculator; a binomial bound for rejection and detection rates.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from matta_tf.serving.ab import (
    ABTest,
    aggregate_by_user,
    analyze_ab_test,
    auroc_cluster_bootstrap,
    auroc_delong,
    log_losses,
    plan_ab_test,
)

ARMS = np.array(["control", "treatment"])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _simulate(seed, users=2000, exposures=(10, 200), effect=0.0, test=None, user_offset=0):
    """Heterogeneous users: per-user base rates from a wide distribution, 10-200 correlated exposures each.

    A user's logit is drawn once (N(-1, 1.5): base rates from ~1% to ~90%); each exposure adds its own
    noise. The model sees the exposure's logit through a per-user miscalibration and noise, the same
    model in both arms. `effect` multiplies every treatment user's outcome probability by `1 + effect`
    (a planted per-user effect on the positive rate; the relative effect on the ratio metric is exactly
    `effect`).
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(user_offset, user_offset + users)
    if test is None:  # a fresh 50/50 randomization per seed (cheaper than hashing; the hash is tested elsewhere)
        test = ABTest.from_shares(f"aa-{seed}", {"control": 0.5, "treatment": 0.5})
        arm_codes = (rng.random(users) < 0.5).astype(np.int64)
    else:
        arm_codes = (test.assign_many(ids) == "treatment").astype(np.int64)
    counts = rng.integers(exposures[0], exposures[1] + 1, users)
    base, bias = rng.normal(-1.0, 1.5, users), rng.normal(0.0, 0.7, users)
    user_of = np.repeat(np.arange(users), counts)
    logit = base[user_of] + rng.normal(0.0, 1.0, len(user_of))
    probability = _sigmoid(logit)
    if effect:
        probability = np.where(arm_codes[user_of] == 1, np.minimum(probability * (1.0 + effect), 1.0), probability)
    outcome = (rng.random(len(user_of)) < probability).astype(np.int64)
    prediction = _sigmoid(logit + bias[user_of] + rng.normal(0.0, 0.8, len(user_of)))
    return pd.DataFrame({
        "user_id": ids[user_of], "arm": pd.Categorical.from_codes(arm_codes[user_of], ARMS),
        "prediction": prediction, "outcome": outcome,
    }), test


def _pre_period(frame, seed):
    """A pre-period of the same users: 5-60 new exposures each at the user's own observed rate (ids as text)."""
    rng = np.random.default_rng(seed)
    units = aggregate_by_user(frame)
    rows = np.repeat(np.arange(len(units)), rng.integers(5, 61, len(units)))
    rate = (units["positives"] / units["exposures"]).to_numpy()
    return pd.DataFrame({"user_id": units["user_id"].astype(str).to_numpy()[rows],
                         "outcome": (rng.random(len(rows)) < rate[rows]).astype(int)})


def _exposure_level_p_values(frame):
    """The analysis before issue 17: every exposure an independent sample. Kept only as a reference here."""
    treated = (frame["arm"] == "treatment").to_numpy()
    y, p = frame["outcome"].to_numpy(), frame["prediction"].to_numpy()
    (auc_t, var_t), (auc_c, var_c) = auroc_delong(p[treated], y[treated]), auroc_delong(p[~treated], y[~treated])
    losses = log_losses(p, y)
    table = [[y[treated].sum(), (1 - y[treated]).sum()], [y[~treated].sum(), (1 - y[~treated]).sum()]]
    return {
        "auroc": 2 * stats.norm.sf(abs(auc_t - auc_c) / np.sqrt(var_t + var_c)),
        "log_loss": stats.ttest_ind(losses[treated], losses[~treated], equal_var=False).pvalue,
        "positive_rate": stats.chi2_contingency(table, correction=False).pvalue,
    }


def test_aa_simulation_rejects_at_alpha_for_every_metric_and_the_exposure_level_method_does_not():
    seeds, alpha = 200, 0.05
    ours = {"auroc": 0, "log_loss": 0, "positive_rate": 0}
    exposure_level = dict.fromkeys(ours, 0)
    for seed in range(seeds):
        frame, test = _simulate(seed)
        comparisons = analyze_ab_test(frame, test, alpha=alpha).comparisons
        for metric, significant in zip(comparisons["metric"], comparisons["significant"], strict=True):
            ours[metric] += bool(significant)
        for metric, p_value in _exposure_level_p_values(frame).items():
            exposure_level[metric] += p_value < alpha
    rates = {metric: count / seeds for metric, count in ours.items()}
    old_rates = {metric: count / seeds for metric, count in exposure_level.items()}
    # Binomial(200, 0.05): sd 0.015; [0.02, 0.08] is two sd either side.
    assert all(0.02 <= rate <= 0.08 for rate in rates.values()), (rates, old_rates)
    assert all(rate >= 0.3 for rate in old_rates.values()), (rates, old_rates)


@pytest.mark.slow
def test_aa_simulation_with_cuped_and_the_user_bootstrap_rejects_at_alpha():
    seeds = 200
    rejections = {"auroc": 0, "log_loss": 0, "positive_rate": 0}
    for seed in range(seeds):
        frame, test = _simulate(seed)
        comparisons = analyze_ab_test(frame, test, pre_period=_pre_period(frame, 10_000 + seed),
                                      auroc_method="bootstrap", bootstrap_resamples=200, seed=seed).comparisons
        assert comparisons["test"].str.contains("CUPED").tolist() == [False, False, True]  # no pre-period predictions
        for metric, significant in zip(comparisons["metric"], comparisons["significant"], strict=True):
            rejections[metric] += bool(significant)
    assert all(0.02 <= count / seeds <= 0.08 for count in rejections.values()), rejections


def _auroc_of_frame(part):
    y, p = part["outcome"].to_numpy(), part["prediction"].to_numpy()
    return p, y, part["user_id"].to_numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_user_clustered_auroc_variance_matches_a_bootstrap_of_users(seed):
    frame, _ = _simulate(100 + seed, users=500)
    p, y, users = _auroc_of_frame(frame[frame["arm"] == "control"])
    auc, variance = auroc_delong(p, y, users)
    draws = auroc_cluster_bootstrap(p, y, users, n_resamples=300, seed=seed)
    assert np.sqrt(variance) == pytest.approx(draws.std(ddof=1), rel=0.15)  # SD of a 300-draw SD: ~4%
    assert abs(draws.mean() - auc) < 0.5 * np.sqrt(variance)
    assert np.sqrt(auroc_delong(p, y)[1]) < 0.6 * np.sqrt(variance)  # exposures as independent: far too narrow


@pytest.mark.slow
def test_user_clustered_auroc_variance_matches_a_bootstrap_of_users_on_many_seeds():
    ratios = []
    for seed in range(20):
        frame, _ = _simulate(200 + seed)
        p, y, users = _auroc_of_frame(frame[frame["arm"] == "treatment"])
        ratios.append(np.sqrt(auroc_delong(p, y, users)[1]) / auroc_cluster_bootstrap(p, y, users, 500, seed).std())
    assert 0.93 < np.mean(ratios) < 1.07 and 0.8 < min(ratios) and max(ratios) < 1.2, ratios


def test_weighted_auroc_of_a_user_resample_is_the_auroc_of_the_resampled_data():
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(30), rng.integers(1, 8, 30))
    y = rng.integers(0, 2, len(users))
    p = np.round(rng.random(len(users)) * 0.5 + 0.3 * y, 1)  # rounded: many ties
    draws = auroc_cluster_bootstrap(p, y, users, n_resamples=5, seed=9, batch_size=2)
    rng = np.random.default_rng(9)  # the draws the function makes: counts per user, in order of first appearance
    for batch in (2, 2, 1):
        for counts in rng.multinomial(30, np.full(30, 1 / 30), size=batch):
            index = np.concatenate([np.flatnonzero(users == user).repeat(count) for user, count in enumerate(counts)])
            u = stats.mannwhitneyu(p[index][y[index] == 1], p[index][y[index] == 0]).statistic
            expected = u / ((y[index] == 1).sum() * (y[index] == 0).sum())
            assert draws[0] == pytest.approx(expected, rel=1e-12)
            draws = draws[1:]
    singletons = np.arange(len(users))  # one example per cluster: DeLong's independent variance
    assert auroc_delong(p, y, singletons)[1] == pytest.approx(auroc_delong(p, y)[1], rel=0.05)


def _delta_reference(units, column):
    """Textbook delta method for a ratio of sums over users: var(R) = var(x - R n) / (K mean(n)^2)."""
    x, n = units[column].to_numpy(), units["exposures"].to_numpy()
    ratio = x.sum() / n.sum()
    return ratio, np.var(x - ratio * n, ddof=1) / (len(x) * n.mean() ** 2), len(x)


def test_ratio_metrics_are_the_delta_method_over_users():
    frame, test = _simulate(7, users=800)
    analysis = analyze_ab_test(frame, test, alpha=0.1)
    units = aggregate_by_user(frame)
    arms, comparisons = analysis.arms.set_index("arm"), analysis.comparisons.set_index("metric")
    for metric, column in (("positive_rate", "positives"), ("log_loss", "log_loss_sum")):
        (r_c, v_c, k_c), (r_t, v_t, k_t) = (_delta_reference(units[units["arm"] == arm], column) for arm in ARMS)
        for arm, (ratio, variance, users) in zip(ARMS, ((r_c, v_c, k_c), (r_t, v_t, k_t)), strict=True):
            half = stats.t.ppf(0.95, users - 1) * np.sqrt(variance)
            assert arms.loc[arm, metric] == pytest.approx(ratio, rel=1e-12)
            assert arms.loc[arm, f"{metric}_ci_low"] == pytest.approx(ratio - half, rel=1e-9)
        se = np.sqrt(v_c + v_t)
        df = (v_c + v_t) ** 2 / (v_c**2 / (k_c - 1) + v_t**2 / (k_t - 1))  # Welch-Satterthwaite
        row = comparisons.loc[metric]
        assert row["difference"] == pytest.approx(r_t - r_c, rel=1e-12)
        assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(r_t - r_c) / se, df), rel=1e-9)
        assert row["difference_ci_high"] == pytest.approx(r_t - r_c + stats.t.ppf(0.95, df) * se, rel=1e-9)
        log_v_c, log_v_t = v_c / r_c**2, v_t / r_t**2  # relative interval: delta method on log(R_t / R_c)
        log_df = (log_v_c + log_v_t) ** 2 / (log_v_c**2 / (k_c - 1) + log_v_t**2 / (k_t - 1))
        high = r_t / r_c * np.exp(stats.t.ppf(0.95, log_df) * np.sqrt(log_v_c + log_v_t)) - 1
        assert row["relative_ci_high"] == pytest.approx(high, rel=1e-9)
    assert analysis.unit == "user_id" and not analysis.cuped


def test_cuped_with_a_pre_period_matches_the_textbook_adjustment_and_narrows_the_interval():
    frame, test = _simulate(11, users=1000)
    pre_period = _pre_period(frame, 12)  # user ids as text, the test's as integers: matched all the same
    units = aggregate_by_user(frame)
    plain = analyze_ab_test(frame, test).comparisons.set_index("metric")
    analysis = analyze_ab_test(frame, test, pre_period=pre_period)
    adjusted = analysis.comparisons.set_index("metric")
    assert analysis.cuped and "CUPED" in adjusted.loc["positive_rate", "test"]

    pre = pre_period.assign(exposures=1).groupby("user_id")[["exposures", "outcome"]].sum()
    units[["m", "x"]] = pre.reindex(units["user_id"].astype(str)).fillna(0).to_numpy()

    def linear(part, numerator, denominator):  # the ratio's linearization per user
        x, n = part[numerator].to_numpy(), part[denominator].to_numpy()
        return (x - x.sum() / n.sum() * n) / n.mean(), x.sum() / n.sum()

    y_all, _ = linear(units, "positives", "exposures")
    x_all, pooled_covariate = linear(units, "x", "m")
    theta = np.cov(y_all, x_all, ddof=1)[0, 1] / np.var(x_all, ddof=1)
    values, variances, counts = [], [], []
    for arm in ARMS:
        part = units[units["arm"] == arm]
        y_lin, ratio = linear(part, "positives", "exposures")
        x_lin, covariate = linear(part, "x", "m")
        values.append(ratio - theta * (covariate - pooled_covariate))
        variances.append(np.var(y_lin - theta * x_lin, ddof=1) / len(part))
        counts.append(len(part))
    se = np.sqrt(sum(variances))
    df = sum(variances) ** 2 / sum(v**2 / (k - 1) for v, k in zip(variances, counts, strict=True))
    row = adjusted.loc["positive_rate"]
    assert row["control"] == pytest.approx(values[0], rel=1e-9)
    assert row["difference"] == pytest.approx(values[1] - values[0], rel=1e-9)
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(values[1] - values[0]) / se, df), rel=1e-7)
    width = row["difference_ci_high"] - row["difference_ci_low"]
    plain_width = plain.loc["positive_rate", "difference_ci_high"] - plain.loc["positive_rate", "difference_ci_low"]
    assert width < 0.8 * plain_width  # the users' own pre-period rate explains much of the between-user variance
    # No prediction in the pre-period: log loss has no covariate and is left as it was.
    assert adjusted.loc["log_loss", "p_value"] == pytest.approx(plain.loc["log_loss", "p_value"], rel=1e-9)
    assert "CUPED" not in adjusted.loc["log_loss", "test"]
    with_predictions = pre_period.assign(prediction=0.3 + 0.4 * pre_period["outcome"])
    both = analyze_ab_test(frame, test, pre_period=with_predictions).comparisons.set_index("metric")
    assert "CUPED" in both.loc["log_loss", "test"]
    assert both.loc["positive_rate", "p_value"] == pytest.approx(row["p_value"], rel=1e-9)


def test_power_calculator_predicts_the_detection_rate_of_a_planted_per_user_effect():
    shape = {"users": 1000, "exposures": (10, 100)}
    pilot, _ = _simulate(10_000, **shape)  # one population, before the test
    effect, sims = 0.1, 200
    plan = plan_ab_test(pilot, "positive_rate", relative_effect=effect, users=shape["users"])
    assert 0.3 < plan["power"] < 0.85  # informative: far from 0 and 1
    detected = 0
    for seed in range(sims):
        frame, test = _simulate(20_000 + seed, effect=effect, **shape)
        row = analyze_ab_test(frame, test).comparisons.set_index("metric").loc["positive_rate"]
        detected += bool(row["significant"] and row["difference"] > 0)
    tolerance = 3 * np.sqrt(plan["power"] * (1 - plan["power"]) / sims)  # binomial error, 3 sd
    assert abs(detected / sims - plan["power"]) < tolerance, (detected / sims, plan)


def test_power_calculator_agrees_with_the_normal_formula_and_round_trips():
    pilot, _ = _simulate(3, users=1500)
    units = aggregate_by_user(pilot, arm=None)
    _, variance, users = _delta_reference(units, "positives")
    per_user = variance * users  # variance of the ratio times users: the per-user variance
    ratio = units["positives"].sum() / units["exposures"].sum()
    plan = plan_ab_test(pilot, "positive_rate", relative_effect=0.05, treatment_share=0.25)
    z = stats.norm.isf(0.025) + stats.norm.isf(0.2)
    expected = z**2 * per_user * (1 / 0.75 + 1 / 0.25) / (0.05 * ratio) ** 2  # users in both arms
    assert plan["users"] == pytest.approx(expected, rel=0.01)  # tea-tasting uses the t distribution
    assert plan["users_treatment"] == pytest.approx(0.25 * plan["users"], abs=1)
    assert plan["users_control"] + plan["users_treatment"] == plan["users"]
    for metric in ("positive_rate", "log_loss", "auroc"):
        mde = plan_ab_test(pilot, metric, users=4000)
        again = plan_ab_test(pilot, metric, relative_effect=mde["relative_effect"], users=4000)
        assert again["power"] == pytest.approx(0.8, abs=0.005), metric
        needed = plan_ab_test(pilot, metric, relative_effect=mde["relative_effect"])
        assert needed["users"] == pytest.approx(4000, rel=0.01), metric
    with pytest.raises(ValueError, match="metric"):
        plan_ab_test(pilot, "ctr", users=100)
    with pytest.raises(ValueError, match="relative_effect"):
        plan_ab_test(pilot, "auroc")
    with pytest.raises(ValueError, match="treatment_share"):
        plan_ab_test(pilot, users=100, treatment_share=1.0)


def test_unit_columns_are_checked_by_name():
    frame, test = _simulate(0, users=50)
    with pytest.raises(ValueError, match="'user_id'"):
        analyze_ab_test(frame.drop(columns="user_id"), test)
    missing = frame.astype({"user_id": object})
    missing.loc[3, "user_id"] = None
    with pytest.raises(ValueError, match="'user_id' has 1 missing"):
        analyze_ab_test(missing, test)
    with pytest.raises(ValueError, match="pre_period.*'outcome'"):
        analyze_ab_test(frame, test, pre_period=frame[["user_id"]])
    with pytest.raises(ValueError, match="'prediction'.*probabilities"):
        analyze_ab_test(frame.assign(prediction=frame["prediction"] + 1), test)
    with pytest.raises(ValueError, match="auroc_method"):
        analyze_ab_test(frame, test, auroc_method="jackknife")


def test_bootstrap_auroc_method_agrees_with_the_clustered_delong_method():
    frame, test = _simulate(4, users=400, exposures=(10, 100))
    delong = analyze_ab_test(frame, test).arms.set_index("arm")
    boot = analyze_ab_test(frame, test, auroc_method="bootstrap", bootstrap_resamples=250).arms.set_index("arm")
    width = (delong["auroc_ci_high"] - delong["auroc_ci_low"]).to_numpy()
    boot_width = (boot["auroc_ci_high"] - boot["auroc_ci_low"]).to_numpy()
    np.testing.assert_allclose(boot_width, width, rtol=0.2)
    np.testing.assert_allclose(boot["auroc"], delong["auroc"])
