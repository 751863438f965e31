"""The loss-weight sweep's table: seed 0's tuning figures and each setting's paired change against its default."""

import importlib.util
import json
import pathlib
import sys

from scipy import stats

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "loss_sweep.py"
_SPEC = importlib.util.spec_from_file_location("loss_sweep", _PATH)
loss_sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(loss_sweep)


def _row(setting, arm, seed, student, labels="teacher", w_d=1.0, validation=0.3):
    config = {"labels": labels, "loss_weights": [1.0, 1.0, w_d], "distillation_ramp_steps": 200,
              "distillation_start_step": 0, "distillation_ramp_shape": "linear"}
    return {"setting": setting, "arm": arm, "seed": seed, "config": config, "validation_auc_loss": validation,
            "student_auc_loss": student, "ta_auc_loss": 0.2}


def _cells(report, setting):
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == setting:
            return cells
    raise AssertionError(f"no row for {setting} in\n{report}")


def test_table_pairs_each_setting_with_the_default_and_baseline_of_its_own_labels():
    default, half, baseline = [0.30, 0.31, 0.29], [0.29, 0.305, 0.282], [0.32, 0.335, 0.31]
    rows = [_row("event_default", "matta_shampoo", 0, 0.9, labels="event")]  # other labels: never paired
    for seed in range(3):
        rows += [_row("default", "baseline", seed, baseline[seed]),
                 _row("default", "matta_shampoo", seed, default[seed]),
                 _row("wd0.5", "matta_shampoo", seed, half[seed], w_d=0.5, validation=0.25 + seed)]
    report = loss_sweep.table(rows)
    cells = _cells(report, "wd0.5")
    change = sum(h / d - 1 for h, d in zip(half, default, strict=True)) / 3
    assert cells[2] == "(1.0, 1.0, 0.5)" and cells[4] == "0.2500"  # seed 0's validation: the tuning figure
    assert cells[7] == "3" and cells[8] == f"{sum(half) / 3:.4f}"
    assert cells[9].startswith(f"{change:+.2%}") and f"p = {stats.ttest_rel(half, default).pvalue:.2g}" in cells[9]
    to_baseline = sum(h / b - 1 for h, b in zip(half, baseline, strict=True)) / 3
    assert cells[10].startswith(f"{to_baseline:+.2%}")
    assert _cells(report, "default")[9] == "-"  # not against itself
    assert _cells(report, "event_default")[9:] == ["-", "-"]  # one seed, and no event-label baseline


def test_the_reference_run_events_are_passed_on_so_that_ablation_accepts_them(tmp_path):
    import argparse
    import json

    spec = importlib.util.spec_from_file_location("ablation", _PATH.parent / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    wanted = argparse.Namespace(data="synthetic", users=500, items=500, events=200_000, latent_dim=64,
                                nonlinear_units=64, interaction_scale=16.0)
    summary = {"source": "synthetic", "config": json.loads(json.dumps(
        ablation.dataclasses.asdict(ablation.synthetic_config(wanted))))}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    options = loss_sweep.reference_events(str(tmp_path))
    assert options[options.index("--interaction-scale") + 1] == "16.0" and "--users" in options
    args = ablation.build_parser().parse_args(["--data", "synthetic", *options])  # read back as ablation.py does
    assert ablation.events_mismatch(summary, args) == []


def _reference(tmp_path):
    data = tmp_path / "reference" / "data"
    data.mkdir(parents=True)
    config = {"num_events": 1000, "num_users": 50, "num_items": 40, "latent_dim": 8, "nonlinear_units": 4,
              "interaction_scale": 16.0}
    (data / "summary.json").write_text(json.dumps({"source": "synthetic", "config": config}))
    return tmp_path / "reference"


def _fake_ablation(calls):
    """Stands in for ablation.py: records its options and appends one final row per arm and seed."""
    def run(command, check):
        assert check
        options = dict(zip(command[2::2], command[3::2], strict=False))
        calls.append(options)
        training = options["--training"]
        weights = [1.0, 1.0, 0.5] if "0.5)" in training else [1.0, 1.0, 1.0]
        with open(pathlib.Path(options["--out"]) / "results.jsonl", "a", encoding="utf-8") as handle:
            for seed in range(int(options["--seeds"])):
                config = {"labels": options["--labels"], "loss_weights": weights, "distillation_ramp_steps": 200,
                          "distillation_start_step": 0, "distillation_ramp_shape": "linear"}
                handle.write(json.dumps({"arm": options["--arms"], "seed": seed, "phase": "final", "config": config,
                                         "learning_rate": float(options["--grid"]), "validation_auc_loss": 0.3,
                                         "student_auc_loss": 0.25 + 0.01 * seed, "ta_auc_loss": 0.2}) + "\n")
    return run


def test_main_runs_each_setting_with_the_sweep_labels_and_the_baseline_at_its_own_rate(tmp_path, monkeypatch):
    reference, root, calls = _reference(tmp_path), tmp_path / "sweep", []
    monkeypatch.setattr(loss_sweep.subprocess, "run", _fake_ablation(calls))
    argv = ["loss_sweep.py", "--reference", str(reference), "--root", str(root), "--labels", "event",
            "--only", "default,wd0.5", "--seeds", "2", "--learning-rate", "3e-3", "--baseline-learning-rate", "1e-2",
            "--model", "embedding_dim=2", "--epochs", "40"]
    monkeypatch.setattr(sys, "argv", argv)
    loss_sweep.main()
    ran = [(c["--out"], c["--arms"], c["--grid"], c["--labels"], c["--training"]) for c in calls]
    assert ran == [(str(root / "event_default"), "baseline", "1e-2", "event", ""),
                   (str(root / "event_default"), "matta_shampoo", "3e-3", "event", ""),
                   (str(root / "event_wd0.5"), "matta_shampoo", "3e-3", "event", "loss_weights=(1.0,1.0,0.5)")]
    assert all(c["--model"] == "embedding_dim=2" and c["--epochs"] == "40" and c["--interaction-scale"] == "16.0"
               and c["--users"] == "50" for c in calls)
    assert (root / "event_wd0.5" / "data").resolve() == (reference / "data").resolve()
    report = (root / "loss_sweep.md").read_text()
    assert _cells(report, "event_wd0.5")[10].startswith("+0.00%")  # paired with the event-label baseline
    assert (root / "loss_sweep.png").stat().st_size > 0
    loss_sweep.main()  # every run is there: nothing is rerun
    assert len(calls) == 3


def test_main_refuses_a_reference_without_events_and_a_rate_that_is_not_a_number(tmp_path, monkeypatch, capsys):
    import pytest

    for argv, wanted in ((["--reference", str(tmp_path)], "--reference"),
                         (["--reference", str(_reference(tmp_path)), "--baseline-learning-rate", "fast"],
                          "--baseline-learning-rate: a positive number is needed. Received 'fast'")):
        monkeypatch.setattr(sys, "argv", ["loss_sweep.py", *argv, "--root", str(tmp_path / "sweep")])
        with pytest.raises(SystemExit):
            loss_sweep.main()
        assert wanted in capsys.readouterr().err


def test_main_sweeps_the_sandwich_arm_beside_an_earlier_sweep_of_fixed_matta(tmp_path, monkeypatch):
    reference, root, calls = _reference(tmp_path), tmp_path / "sweep", []
    monkeypatch.setattr(loss_sweep.subprocess, "run", _fake_ablation(calls))
    base = ["loss_sweep.py", "--reference", str(reference), "--root", str(root), "--only", "default", "--seeds", "2"]
    monkeypatch.setattr(sys, "argv", base)
    loss_sweep.main()  # fixed MatTA first (its default's baseline included)
    monkeypatch.setattr(sys, "argv", [*base, "--arm", "matta_sandwich"])
    loss_sweep.main()
    assert [c["--arms"] for c in calls] == ["baseline", "matta_shampoo", "matta_sandwich"]  # the baseline is reused
    assert "| default | teacher |" in (root / "loss_sweep.md").read_text()
