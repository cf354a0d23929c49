"""Every figure script runs in --quick mode through ``gradflow figures NAME --quick --out DIR``,
writes NAME.png, .pdf and .json there (never into figures/), and its numbers support the figure's claim."""

import json
from pathlib import Path

import numpy as np
import pytest

from gradflow import cli

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FIGURES = ("emergence", "simple_examples", "scaling", "phase_diagram", "ood", "flow_vs_sampled", "lazy_walk")


def check_emergence(data):
    final = data["final"]
    assert min(final["forward_prob"]) > 0.99  # every position learns to step forward
    assert final["reward"] > 0.99
    assert abs(final["expected_length"] - data["minimal_length"]) < 0.01 * data["minimal_length"]
    alpha, beta, gamma = final["alpha_beta_gamma"]
    assert alpha > 0.3 and gamma < 0.0 and alpha > beta  # alpha rises, gamma falls


def check_simple_examples(data):
    claim = data["claim"]
    assert claim["k1_max_reward"] < 0.6 and claim["k4_final_reward"] > 0.9 and claim["holds"]
    hits = data["t_hit_0.9"]["near zero (authors)"]
    assert hits["1"] is None and hits["4"] < hits["3"] < hits["2"]  # more simple starts learn sooner
    assert set(data["sampled"]) == {"1", "2", "3", "4"}


def check_scaling(data):
    claim = data["claim"]
    assert claim["holds"] and claim["rate_hardest"] > claim["rate_uniform"]
    assert set(data["curves"]) == {"uniform", "hardest only", "c = 0.5 on d = 1", "c = 0.1 on d = 1", "c = 0.01 on d = 1"}


def check_phase_diagram(data):
    times = np.array(data["times"], dtype=float)
    assert times.shape == (len(data["cs"]), len(data["ns"]))
    assert data["claim"]["hardest_slowest"] and data["claim"]["monotone_in_c"]


def check_ood(data):
    claim = data["claim"]
    assert claim["reward_n8"] >= 0.99 and claim["reward_n12"] >= 0.99 and claim["holds"]
    assert all(r >= 0.99 for r in data["isolated"]["reward_final"].values())


def check_flow_vs_sampled(data):
    errors = list(data["claim"]["errors"].values())
    assert data["claim"]["holds"] and errors[0] < errors[-1]
    assert data["flow"]["reward"][-1] > 0.9
    assert set(data["sampled"]) == {"REINFORCE + SGD", "REINFORCE + Adam"}


def check_lazy_walk(data):
    final = data["final"]
    assert data["max_abs_reward_difference"] < 1e-6  # same flow, same reward
    assert final["length_self_loops"] > 2.0 * final["length_masked"]


def test_every_figure_has_a_script():
    assert {p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_")} == set(FIGURES)


@pytest.mark.parametrize("name", FIGURES)
def test_figure_quick(name, tmp_path):
    assert cli.main(["figures", name, "--quick", "--out", str(tmp_path)]) == 0
    for ext in ("png", "pdf", "json"):
        path = tmp_path / f"{name}.{ext}"
        assert path.exists() and path.stat().st_size > 0, path
    assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    globals()[f"check_{name}"](data)
    if name == "emergence":  # `gradflow run` draws the same figure (same compiled flow: run it here)
        out = tmp_path / "run" / "emergence.png"
        assert cli.main(["run", "--no-progress", "--t1", "1000", "--figure", str(out)]) == 0
        for ext in ("png", "pdf", "json"):
            assert out.with_suffix(f".{ext}").stat().st_size > 0
        check_emergence(json.loads(out.with_suffix(".json").read_text()))
