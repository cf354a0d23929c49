"""Figure `emergence`: how forward traversal emerges under the gradient flow (n = 8, uniform starts).

alpha, beta, gamma against log t; reward and loss; P(forward | move) per position as a heatmap over
position x log t (which positions learn first, at the emergence and traversal levels of
``gradflow.theory.phases``); expected chain-of-thought length against the minimal one.
Regenerate: ``gradflow figures emergence`` (or ``python experiments/emergence.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import claim_failures, draw_emergence, emergence_data, experiment_parser, run_experiment

NAME = "emergence"


@dataclass(frozen=True)
class Preset:
    """n: vertices per chain; t1: last flow time; theta0: (alpha, beta, gamma) at t = 0."""

    n: int
    t1: float
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(n=8, t1=1e3)
FULL = Preset(n=8, t1=1e4)


def compute(preset: Preset) -> dict:
    """The flow on uniform starts, read out (``gradflow.plotting.emergence_data``)."""
    params = FlowParams(ChainTask.uniform(preset.n), ModelSpec(), Theta(*preset.theta0), t1=preset.t1)
    return emergence_data(simulate(params, progress=False))


def check(data: dict) -> list[str]:
    """Every position learns to step forward, J -> 1, the length -> minimal, alpha rises above beta and gamma falls."""
    final = data["final"]
    alpha, beta, gamma = final["alpha_beta_gamma"]
    reward = np.asarray(data["reward"], dtype=float)
    return claim_failures(
        {
            "every position steps forward with P > 0.99 at t1": min(final["forward_prob"]) > 0.99,
            "J > 0.99 at t1": final["reward"] > 0.99,
            "expected length within 1% of the minimal": abs(final["expected_length"] - data["minimal_length"])
            < 0.01 * data["minimal_length"],
            "alpha > 0.3, alpha > beta, gamma < 0 at t1": alpha > 0.3 and alpha > beta and gamma < 0.0,
            "J never falls (gradient ascent)": bool(np.all(np.diff(reward[np.isfinite(reward)]) > -1e-9)),
        }
    )


def draw(data: dict, preset: Preset):
    return draw_emergence(data)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help=f"vertices per chain (default {FULL.n})")
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
