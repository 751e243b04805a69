"""The label-shift test's level and power on synthetic months (issue #44, docs/BENCHMARKS.md "Run 4"): nothing here
reads an image or the test split.

    .venv/bin/python benchmarks/label_shift_level.py [--months 150] [--seed 2026]

The world is the unit tests' (fixtures/label_shift_world.py, ``draw``): class logits at +-1.6, the exact
posterior at val's 74% as the calibrated probability, and an ``ood_score`` whose NORMAL and PNEUMONIA images score
differently (log means -1.3 and -1.0, sd 0.5) beyond what the probability says. Each month: 1,000 val images, then
600 answers (images scoring at most 1) at a prevalence drawn uniformly from 10-90%, tested with ``ood_score``
(val re-weighted by label) and with the probabilities alone, 200 draws each; then 40 months whose NORMAL images are
0.4 log units further for the detector (the probabilities unchanged), prevalence 20-80%, 400 draws. Then the same
with the detector's two scores logged beside ``ood_score`` (``draw_detector``: content_z and acquisition_z, correlated
0.3, a little apart by class, ``ood_score`` their combined statistic): the level of the four-quantity test, and 40
months whose NORMAL images are 0.5 sd nearer train for the acquisition detector, tested on all four and on the
probability and ``ood_score`` alone (issue #44, run 5). One JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from fixtures.label_shift_world import PREVALENCE, answered, draw, draw_detector  # noqa: E402
from xray.monitoring.performance.label_shift import DETECTOR, label_shift_test  # noqa: E402


@click.command()
@click.option("--months", default=150, show_default=True, help="Label-shifted months for the level.")
@click.option("--seed", default=2026, show_default=True)
def main(months: int, seed: int) -> None:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    joint, alone = [], []
    for index in range(months):
        prevalence = rng.uniform(0.1, 0.9)
        val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
        p, s = answered(*draw(rng, 600, prevalence))
        joint.append(label_shift_test(p, val_p, 200, index, s, val_s, val_y).p_value)
        alone.append(label_shift_test(p, val_p, 200, index).p_value)
    moved = []
    for index in range(40):
        val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
        p, s = answered(*draw(rng, 600, rng.uniform(0.2, 0.8), normal_scores=0.4))
        moved.append(
            (
                label_shift_test(p, val_p, 400, index, s, val_s, val_y).p_value,
                label_shift_test(p, val_p, 400, index).p_value,
            )
        )
    refused = {
        f"refused_at_{alpha:g}": {
            "joint": float(np.mean(np.array(joint) < alpha)),
            "probabilities": float(np.mean(np.array(alone) < alpha)),
        }
        for alpha in (0.01, 0.05, 0.2)
    }
    power = np.mean(np.array(moved) < 0.01, axis=0)
    four, nearer = [], []
    for index in range(months):
        val_p, val_s, val_y = draw_detector(rng, 1000, PREVALENCE)
        p, s = answered(*draw_detector(rng, 600, rng.uniform(0.1, 0.9)))
        four.append(label_shift_test(p, val_p, 200, index, s, val_s, val_y, DETECTOR).p_value)
    for index in range(40):
        val_p, val_s, val_y = draw_detector(rng, 1000, PREVALENCE)
        p, s = answered(*draw_detector(rng, 600, rng.uniform(0.2, 0.8), normal_acquisition=-0.5))
        nearer.append(
            (
                label_shift_test(p, val_p, 400, index, s, val_s, val_y, DETECTOR).p_value,
                label_shift_test(p, val_p, 400, index, s[:, 0], val_s[:, 0], val_y).p_value,
            )
        )
    detector = {f"refused_at_{alpha:g}": float(np.mean(np.array(four) < alpha)) for alpha in (0.01, 0.05, 0.2)}
    caught = np.mean(np.array(nearer) < 0.01, axis=0)
    detector["normal_acquisition_-0.5_refused_at_0.01"] = {
        "four": float(caught[0]),
        "probability_and_ood_score": float(caught[1]),
    }
    print(
        json.dumps(
            {"months": months, "seed": seed}
            | refused
            | {
                "normal_scores_0.4_refused_at_0.01": {"joint": float(power[0]), "probabilities": float(power[1])},
                "with_the_detectors_two_scores": detector,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
