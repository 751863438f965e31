"""Calibration of `serving.ab.analyze_ab_test` at the user, against the exposure-level analysis it replaced.

On the simulation of tests/test_ab_units.py (imported from there, so the benchmark and the tests
share one definition): 2,000 heterogeneous users with 10-200 correlated exposures each.

- A/A over `--seeds` seeds: the rejection rate at alpha = 0.05 of each metric, by the user-level
  analysis (plain and with CUPED on a pre-period of the same users) and by the old exposure-level
  analysis (two-proportion z-test, Welch over exposures, DeLong with independent exposures).
- The user-clustered DeLong standard error of AUROC against a bootstrap of users, on a few seeds.
- Power: predicted by `plan_ab_test` from a pilot, against the detection rate of a planted per-user
  effect on the positive rate.

Run: `python benchmarks/ab_calibration.py [--seeds 200]` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_ab_units import _exposure_level_p_values, _pre_period, _simulate  # noqa: E402

from matta_tf.serving.ab import (  # noqa: E402
    analyze_ab_test,
    auroc_cluster_bootstrap,
    auroc_delong,
    plan_ab_test,
)

METRICS = ("auroc", "log_loss", "positive_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    start = time.time()
    counts = {name: dict.fromkeys(METRICS, 0) for name in ("user", "user_cuped", "exposure")}
    for seed in range(args.seeds):
        frame, test = _simulate(seed)
        for name, pre in (("user", None), ("user_cuped", _pre_period(frame, 10_000 + seed))):
            table = analyze_ab_test(frame, test, pre_period=pre).comparisons
            for metric, significant in zip(table["metric"], table["significant"], strict=True):
                counts[name][metric] += bool(significant)
        for metric, p_value in _exposure_level_p_values(frame).items():
            counts["exposure"][metric] += p_value < 0.05
    print(f"A/A, {args.seeds} seeds, 2,000 users, 10-200 exposures each: rejection rate at alpha = 0.05\n")
    print("| analysis | " + " | ".join(METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    for name, label in (("user", "per user (this module)"), ("user_cuped", "per user, CUPED"),
                        ("exposure", "per exposure (before issue 17)")):
        print(f"| {label} | " + " | ".join(f"{counts[name][m] / args.seeds:.3f}" for m in METRICS) + " |")

    print("\nAUROC standard error, control arm: user-clustered DeLong / bootstrap of users (1,000 resamples)\n")
    for seed in range(5):
        frame, _ = _simulate(500 + seed)
        part = frame[frame["arm"] == "control"]
        p, y, users = part["prediction"].to_numpy(), part["outcome"].to_numpy(), part["user_id"].to_numpy()
        clustered = np.sqrt(auroc_delong(p, y, users)[1])
        boot = auroc_cluster_bootstrap(p, y, users, 1000, seed).std(ddof=1)
        independent = np.sqrt(auroc_delong(p, y)[1])
        print(f"- seed {seed}: clustered {clustered:.5f}, bootstrap {boot:.5f} (ratio {clustered / boot:.3f}); "
              f"independent-exposure DeLong {independent:.5f}")

    shape = {"users": 1000, "exposures": (10, 100)}
    pilot, _ = _simulate(10_000, **shape)
    plan = plan_ab_test(pilot, "positive_rate", relative_effect=0.1, users=shape["users"])
    detected = 0
    for seed in range(args.seeds):
        frame, test = _simulate(20_000 + seed, effect=0.1, **shape)
        row = analyze_ab_test(frame, test).comparisons.set_index("metric").loc["positive_rate"]
        detected += bool(row["significant"] and row["difference"] > 0)
    print(f"\nPower, +10% per-user effect on the positive rate, 1,000 users: predicted {plan['power']:.3f}, "
          f"observed {detected / args.seeds:.3f} over {args.seeds} tests "
          f"(binomial sd {np.sqrt(plan['power'] * (1 - plan['power']) / args.seeds):.3f})")
    print(f"\nwall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
