"""The ablation report: relative AucLoss changes, the paired t-test over seeds, the capacity gap."""

import argparse
import importlib.util
import math
import pathlib

import pytest
from scipy import stats

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
_SPEC = importlib.util.spec_from_file_location("ablation", _PATH)
ablation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ablation)


def _rows():
    baseline = [0.30, 0.32, 0.31]
    matta = [0.27, 0.30, 0.28]
    ta = [0.25, 0.26, 0.25]
    ta_gain = [0.010, 0.012, 0.009]
    rows = []
    for seed in range(3):
        rows.append(dict(arm="baseline", seed=seed, seconds=60, student_auc_loss=baseline[seed], ta_auc_loss=0.5))
        rows.append(dict(arm="matta_shampoo", seed=seed, seconds=120, student_auc_loss=matta[seed],
                         ta_auc_loss=ta[seed] - ta_gain[seed]))
        rows.append(dict(arm="ta_alone", seed=seed, seconds=90, student_auc_loss=0.5, ta_auc_loss=ta[seed]))
    return rows, baseline, matta, ta, ta_gain


def _table_row(report, arm, stream):
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [arm, stream]:
            return cells
    raise AssertionError(f"no row for {arm}/{stream} in\n{report}")


def test_summary_reports_relative_change_paired_test_and_gap(tmp_path):
    rows, baseline, matta, ta, ta_gain = _rows()
    report = ablation.summarize(rows, argparse.Namespace(seeds=3, out=str(tmp_path), data="synthetic"))
    cells = _table_row(report, "matta_shampoo", "student")
    relative = [m / b - 1 for m, b in zip(matta, baseline, strict=True)]
    mean = sum(relative) / 3
    assert cells[5].startswith(f"{mean:+.2%}")
    # Paired t-test written out: t = mean(d) / (sd(d) / sqrt(n)), two-sided, n - 1 degrees of freedom.
    d = [m - b for m, b in zip(matta, baseline, strict=True)]
    d_mean = sum(d) / 3
    sd = math.sqrt(sum((x - d_mean) ** 2 for x in d) / 2)
    p_value = 2 * stats.t.sf(abs(d_mean / (sd / math.sqrt(3))), df=2)
    assert float(cells[6]) == pytest.approx(p_value, rel=1e-2)
    assert _table_row(report, "baseline", "student")[5] == "-"
    ta_relative = sum(-g / t for t, g in zip(ta, ta_gain, strict=True)) / 3
    assert _table_row(report, "matta_shampoo", "ta")[5].startswith(f"{ta_relative:+.2%}")
    gap = sum((1 - t) - (1 - b) for t, b in zip(ta, baseline, strict=True)) / 3
    assert f"{gap:+.4f}" in report


def test_the_ta_at_its_own_best_epoch_is_a_row_of_its_own_paired_with_the_ta_alone(tmp_path):
    rows, _, _, ta, _ = _rows()
    own = [0.24, 0.27, 0.245]
    for row in rows:
        if row["arm"] == "matta_shampoo":
            row.update(ta_own_best_auc_loss=own[row["seed"]], ta_own_best_epoch=3 + row["seed"], epochs_run=9)
    report = ablation.summarize(rows, argparse.Namespace(seeds=3, out=str(tmp_path), data="synthetic"))
    cells = _table_row(report, "matta_shampoo", "ta, own best epoch")
    relative = sum(o / t - 1 for o, t in zip(own, ta, strict=True)) / 3
    assert cells[3] == f"{sum(own) / 3:.4f}" and cells[5].startswith(f"{relative:+.2%}")
    assert float(cells[6]) == pytest.approx(stats.ttest_rel(own, ta).pvalue, rel=1e-2)
    assert cells[9] == "4.0"  # the TA's own best epoch, not the epochs run
    assert _table_row(report, "matta_shampoo", "ta")[9] == "9.0"
    del rows[1]["ta_own_best_auc_loss"]  # an old row without it: left out, not read as missing data
    assert _table_row(ablation.summarize(rows, argparse.Namespace(seeds=3, out=str(tmp_path), data="synthetic")),
                      "matta_shampoo", "ta, own best epoch")[2] == "2"


def test_each_arm_takes_the_grid_rate_with_the_best_mean_validation_auc_loss():
    rows = []
    for arm, best in (("baseline", 1e-2), ("matta_shampoo", 2e-3)):
        for rate in (1e-3, 2e-3, 1e-2):
            for seed, noise in ((0, 0.001), (1, -0.001)):
                value = 0.30 + abs(rate - best) + noise
                rows.append(dict(arm=arm, seed=seed, phase="tune", learning_rate=rate, validation_auc_loss=value))
    rows.append(dict(arm="baseline", seed=0, phase="final", learning_rate=1e-3, validation_auc_loss=0.0))
    chosen = ablation.chosen_learning_rates(rows, ["baseline", "matta_shampoo"], [1e-3, 2e-3, 1e-2])
    assert chosen == {"baseline": 1e-2, "matta_shampoo": 2e-3}  # final rows never decide
    with pytest.raises(ValueError, match="no tuning runs for arm 'ta_alone'"):
        ablation.chosen_learning_rates(rows, ["ta_alone"], [1e-3])
    report = ablation.summarize(rows + [dict(arm="baseline", seed=1, phase="final", learning_rate=1e-2, seconds=6,
                                             student_auc_loss=0.3, ta_auc_loss=0.5, epochs_run=4)],
                                argparse.Namespace(seeds=3, out="unused", data="synthetic"))
    assert _table_row(report, "baseline", "student")[2] == "2"  # tuning rows are not results


def test_strategies_are_compared_on_the_same_specs_against_the_baseline(tmp_path):
    import pandas as pd

    tables = {
        "matta_shampoo": pd.DataFrame({"spec": ["student", "random-0", "ta"], "parameters": [10, 20, 40],
                                       "auc_loss": [0.30, 0.33, 0.25]}),
        "matta_sandwich": pd.DataFrame({"spec": ["student", "random-0", "ta"], "parameters": [10, 20, 40],
                                        "auc_loss": [0.30, 0.28, 0.25]}),
    }
    text = ablation.plot_strategies(tables, 0.31, argparse.Namespace(out=str(tmp_path), data="synthetic"))
    assert (tmp_path / "mixnmatch_strategies.png").stat().st_size > 0
    row = next(line for line in text.splitlines() if line.startswith("| random-0 "))
    assert [c.strip() for c in row.strip("|").split("|")] == ["random-0", "20", "0.3300", "0.2800"]


def test_further_pairs_are_compared_over_common_seeds(tmp_path):
    rows, baseline, matta, _, _ = _rows()
    shampoo = [0.29, 0.31, 0.285]
    rows += [dict(arm="shampoo_only", seed=s, seconds=60, student_auc_loss=v, ta_auc_loss=v)
             for s, v in enumerate(shampoo)]
    report = ablation.summarize(rows, argparse.Namespace(seeds=3, out=str(tmp_path), data="synthetic"))
    line = next(line for line in report.splitlines() if line.startswith("- matta_shampoo vs shampoo_only"))
    relative = [m / s - 1 for m, s in zip(matta, shampoo, strict=True)]
    p_value = stats.ttest_rel(matta, shampoo).pvalue
    assert f"{sum(relative) / 3:+.2%}" in line and f"p = {p_value:.3g}" in line and "3 seeds" in line
    assert "offline_distill" not in report  # pairs whose arms did not run are left out


def test_model_settings_reach_every_arm_and_the_arm_own_settings_win():
    settings = ablation.keyword_literals("embedding_dim=8,tower_units=(32, 16),ta_only_blocks=3", "--model")
    assert settings == {"embedding_dim": 8, "tower_units": (32, 16), "ta_only_blocks": 3}
    args = argparse.Namespace(labels="event", data="synthetic", learning_rate=3e-3, epochs=2, batch_size=256,
                              model=settings, training={})
    plain = ablation.training_config(args, 0, ablation.ARMS["baseline"][2]).model
    control = ablation.training_config(args, 0, ablation.ARMS["init_control"][2]).model
    for model in (plain, control):
        assert (model.embedding_dim, model.tower_units, model.ta_only_blocks) == (8, (32, 16), 3)
    assert (plain.student_init, control.student_init) == ("standalone", "ta_slice")


@pytest.mark.parametrize("text", ["embedding_dim=__import__('os').getpid()", "8", "embedding_dim=", "a=[x]"])
def test_model_settings_run_no_code_and_name_the_option(text):
    with pytest.raises(SystemExit, match="--model is key=literal"):
        ablation.keyword_literals(text, "--model")


def test_training_settings_reach_every_arm_and_only_settable_fields_are_taken():
    settings = ablation.config_settings("loss_weights=(1.0, 0.5, 2.0),distillation_ramp_steps=2000", "--training",
                                        ablation.TRAINING_SETTINGS)
    args = argparse.Namespace(labels="event", data="synthetic", learning_rate=3e-3, epochs=2, batch_size=256,
                              model={}, training=settings)
    for arm in ("baseline", "matta_shampoo", "init_control"):
        config = ablation.training_config(args, 4, ablation.ARMS[arm][2])
        assert (config.loss_weights, config.distillation_ramp_steps, config.seed) == ((1.0, 0.5, 2.0), 2000, 4)
    for text in ("seed=3", "learning_rate=0.1", "loss_weight=(1, 1, 1)"):  # own options, or a typo
        with pytest.raises(SystemExit, match=r"--training: unknown or not settable field\(s\) \['"):
            ablation.config_settings(text, "--training", ablation.TRAINING_SETTINGS)


def test_mixnmatch_over_seeds_counts_pareto_sizes_that_beat_the_same_seed_baseline():
    import pandas as pd

    def sizes(*pairs):
        return [{"spec": f"s{i}", "parameters": p, "auc_loss": a} for i, (p, a) in enumerate(pairs)]

    rows = [dict(arm="baseline", seed=0, student_auc_loss=0.30), dict(arm="baseline", seed=1, student_auc_loss=0.31),
            # seed 0: 0.29 and 0.28 on the front and better; 0.31 off the front (a cheaper size is better); NaN: skipped
            dict(arm="matta_sandwich", seed=0, student_auc_loss=0.29,
                 mixnmatch=sizes((100, 0.29), (200, 0.31), (300, 0.28), (250, float("nan")))),
            # seed 1: the Student (front) is worse than this seed's baseline, the TA (front) better
            dict(arm="matta_sandwich", seed=1, student_auc_loss=0.315, mixnmatch=sizes((100, 0.315), (300, 0.30))),
            dict(arm="matta_sandwich", seed=2, student_auc_loss=0.2, mixnmatch=sizes((100, 0.2)))]  # no baseline
    frame = pd.DataFrame([{k: v for k, v in row.items() if k != "mixnmatch"} for row in rows])
    (line,) = [text for text in ablation.pareto_over_seeds(rows, frame) if text]
    assert "seeds [0, 1] (matta_sandwich)" in line
    assert "3 of 5 extracted sizes beat" in line and "on the Pareto fronts 3 of 4" in line
    assert f"{0.29 / 0.30 - 1:+.2%}, {0.315 / 0.31 - 1:+.2%}" in line


def test_oracle_is_the_exact_auroc_of_the_hidden_truth_on_the_test_events(tmp_path):
    from matta_tf.data import SyntheticConfig, generate_synthetic
    from matta_tf.data.synthetic import GroundTruth, generate_chunk

    config = SyntheticConfig(num_users=50, num_items=40, num_events=3_000, chunk_size=10_000, num_shards=2,
                             seed=7)
    generate_synthetic(str(tmp_path / "data"), config, progress=False)
    # Regenerated independently: one chunk per split, so the test events are chunk 2 (events 2700..2999).
    test = generate_chunk(GroundTruth(config), 2, 2_700, 300)
    positive, logits = test["label"].astype(bool), test["true_logit"]
    difference = logits[positive][:, None] - logits[~positive][None, :]
    pairs = (difference > 0).mean() + 0.5 * (difference == 0).mean()  # P(positive above negative), ties 1/2
    assert ablation.oracle_auc_loss(str(tmp_path / "data")) == pytest.approx(1.0 - pairs, abs=1e-9)


def test_oracle_is_reported_against_the_baseline_and_absent_without_a_hidden_truth(tmp_path):
    rows, baseline, *_ = _rows()
    args = argparse.Namespace(seeds=3, out=str(tmp_path), data="synthetic")
    report = ablation.summarize(rows, args, oracle=0.25)
    ta = sum(row["ta_auc_loss"] for row in rows if row["arm"] == "ta_alone") / 3
    assert (f"test AucLoss: 0.2500; above it: the baseline Student {sum(baseline) / 3 / 0.25 - 1:+.1%}, "
            f"the TA alone {ta / 0.25 - 1:+.1%}.") in report
    assert "Oracle" not in ablation.summarize(rows, args)
    (tmp_path / "summary.json").write_text('{"source": "movielens"}')
    assert ablation.oracle_auc_loss(str(tmp_path)) is None


@pytest.mark.parametrize(("option", "text", "named"), [
    ("--training", "loss_weights=(1.0, 2.0)", "training.loss_weights"),
    ("--training", "distillation_ramp_shape='step'", "training.distillation_ramp_shape"),
    ("--model", "embedding_dim=0", "training.model.embedding_dim"),
])
def test_bad_settings_are_refused_before_any_event_is_generated(tmp_path, monkeypatch, capsys, option, text, named):
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["ablation.py", "--out", str(out), "--events", "1000", option, text])
    with pytest.raises(SystemExit):
        ablation.main()
    error = capsys.readouterr().err
    assert f"{option}: {named}" in error and "Received" in error
    assert not out.exists()


def test_good_settings_pass_the_check_and_reach_the_events(tmp_path, monkeypatch):
    reached = []
    monkeypatch.setattr(ablation, "prepare_data", lambda args: reached.append(args) or str(tmp_path))
    monkeypatch.setattr(ablation, "run_arms", lambda args, data_dir: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr("sys.argv", ["ablation.py", "--out", str(tmp_path), "--training", "loss_weights=(1.0,1.0,0.5)",
                                     "--model", "tower_units=(32, 16),embedding_dim=2"])
    with pytest.raises(KeyboardInterrupt):
        ablation.main()
    assert reached[0].training == {"loss_weights": (1.0, 1.0, 0.5)}


def test_events_already_there_must_be_the_ones_the_options_describe(tmp_path):
    import json
    import os

    from matta_tf.data import generate_synthetic

    args = argparse.Namespace(out=str(tmp_path / "run"), data="synthetic", users=30, items=20, events=600,
                              latent_dim=4, nonlinear_units=8, interaction_scale=8.0)
    generate_synthetic(str(tmp_path / "events"), ablation.synthetic_config(args), progress=False)
    os.makedirs(args.out)
    os.symlink(tmp_path / "events", tmp_path / "run" / "data")  # shared events, as the sweeps share them
    assert ablation.prepare_data(args) == str(tmp_path / "run" / "data")  # the same options: reused
    with pytest.raises(SystemExit, match=r"--interaction-scale 16\.0 \(the events have 8\.0\)") as refused:
        ablation.prepare_data(argparse.Namespace(**{**vars(args), "interaction_scale": 16.0}))
    assert "--users" not in str(refused.value) and str(tmp_path / "events") in str(refused.value)
    with pytest.raises(SystemExit, match=r"--data 'movielens' \(the events are 'synthetic'\)"):
        ablation.prepare_data(argparse.Namespace(**{**vars(args), "data": "movielens"}))
    summary = json.loads((tmp_path / "events" / "summary.json").read_text())
    del summary["config"]["teacher_labels"]  # a summary from before a field existed: read with its default
    assert ablation.events_mismatch(summary, args) == ["teacher_labels (not an ablation.py option) True "
                                                       "(the events have False)"]
    summary["config"].update(teacher_labels=True, num_shards=1, seed=0)  # the layout is not the events
    assert ablation.events_mismatch(summary, args) == ["seed (not an ablation.py option) 1234 (the events have 0)"]
