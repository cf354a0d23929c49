"""Every figure script runs in --quick mode through ``gradflow figures NAME --quick --out DIR``,
writes NAME.png, .pdf and .json there (never into figures/), and its numbers support the figure's claim."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import gradflow as gf
from gradflow import cli
from gradflow._series import first_crossing

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FIGURES = ("emergence", "simple_examples", "scaling", "phase_diagram", "ood", "flow_vs_sampled", "lazy_walk")


NEW_FIGURES = ("horizon", "authors_setting", "noise", "design")  # tested by their owners' test files

# Every check below recomputes the figure's claim from the numbers in its JSON; no script's own
# "holds" flag is trusted.


def _arr(x):
    """A JSON list (null = NaN) as a float array."""
    return np.array([np.nan if v is None else v for v in np.ravel(np.array(x, dtype=object))], dtype=float).reshape(
        np.shape(np.array(x, dtype=object))
    )


def check_emergence(data):
    final = data["final"]
    assert min(final["forward_prob"]) > 0.99  # every position learns to step forward
    assert final["reward"] > 0.99
    assert abs(final["expected_length"] - data["minimal_length"]) < 0.01 * data["minimal_length"]
    alpha, beta, gamma = final["alpha_beta_gamma"]
    assert alpha > 0.3 and gamma < 0.0 and alpha > beta  # alpha rises, gamma falls
    reward = _arr(data["reward"])
    assert np.all(np.diff(reward[np.isfinite(reward)]) > -1e-9)  # gradient ascent: J never falls
    np.testing.assert_allclose(final["reward"], reward[-1])


def check_simple_examples(data):
    flow = data["flow"]["near zero (authors)"]
    hardest = {k: _arr(flow[k]["hardest_reward"]) for k in ("1", "2", "3", "4")}
    assert np.nanmax(hardest["1"]) < 0.6  # hardest-only training stays near chance
    assert hardest["4"][-1] > 0.9  # with the one-step start it learns
    hits = {k: first_crossing(_arr(flow[k]["ts"]), h, 0.9) for k, h in hardest.items()}
    assert hits["1"] is None and hits["4"] < hits["3"] < hits["2"]  # more simple starts learn sooner
    assert set(data["sampled"]) == {"1", "2", "3", "4"}


def _rate(ns, times):
    """Least-squares slope of log T against n over the finite times."""
    ns, times = np.asarray(ns, float), _arr(times)
    keep = np.isfinite(times)
    return float(np.polyfit(ns[keep], np.log(times[keep]), 1)[0])


def check_scaling(data):
    curves = data["curves"]
    assert set(data["curves"]) >= {"uniform", "hardest only", "c = 0.5 on d = 1", "c = 0.1 on d = 1", "c = 0.01 on d = 1"}
    hard, uniform = curves["hardest only"], curves["uniform"]
    assert _rate(hard["ns"], hard["times"]) > _rate(uniform["ns"], uniform["times"])
    common = [n for n in hard["ns"] if n in uniform["ns"]]
    ratio = [_arr(hard["times"])[hard["ns"].index(n)] / _arr(uniform["times"])[uniform["ns"].index(n)] for n in common]
    assert len(common) >= 2 and ratio[-1] > ratio[0]  # the gap grows with n
    law = data["hardest_only_law"]  # recompute the n log n fit from the times and check what it claims
    ns, log_t = np.asarray(law["ns"], float), np.log(_arr(hard["times"])[np.isfinite(_arr(hard["times"]))])
    design = np.stack([np.ones_like(ns), ns, ns * np.log(ns)], axis=1)
    coef = np.linalg.lstsq(design, log_t, rcond=None)[0]
    np.testing.assert_allclose(coef, law["fits"]["exp_n_log_n"]["coef"], rtol=1e-6, atol=1e-9)
    assert law["fits"]["exp_n_log_n"]["rss"] <= law["fits"]["exp"]["rss"] + 1e-12  # the nested fit is never worse
    np.testing.assert_allclose(law["local_rate"], np.diff(log_t) / np.diff(ns), rtol=1e-9)


def check_phase_diagram(data):
    times = _arr(data["times"])
    cs = np.asarray(data["cs"], float)
    assert times.shape == (len(cs), len(data["ns"]))
    slow = np.nan_to_num(times, nan=np.inf)  # NaN: not learned by t1
    assert cs[0] == 0.0 and np.all(slow[0] >= slow.max(axis=0))  # hardest only is the slowest
    easy = (cs > 0) & (cs <= 0.5)
    assert np.all(np.diff(slow[easy], axis=0) <= 1e-9 * np.maximum(1.0, slow[easy][:-1]))  # more easy mass, never slower


def check_ood(data):
    trained = data["trained"]["4"]
    rewards = _arr(trained["reward"])  # (snapshots, eval_ns)
    final = dict(zip(data["eval_ns"], rewards[-1]))
    assert final[8] >= 0.99 and final[12] >= 0.99
    assert all(_arr(r)[-1] >= 0.99 for r in data["isolated"]["reward"].values())


def check_flow_vs_sampled(data):
    flow_ts, flow_theta = _arr(data["flow"]["ts"]), _arr(data["flow"]["theta"])
    errors = []
    for _lr, gd in sorted(data["gradient_descent"].items(), key=lambda kv: float(kv[0])):
        ts, theta = _arr(gd["ts"]), _arr(gd["theta"])
        index = [int(np.argmin(np.abs(flow_ts - t))) for t in ts]
        np.testing.assert_allclose(flow_ts[index], ts, atol=1e-9)  # compared at the same times
        errors.append(float(np.max(np.abs(theta - flow_theta[index]))))
    assert len(errors) >= 2 and np.all(np.diff(errors) > 0)  # gradient descent -> flow as lr -> 0
    assert _arr(data["flow"]["reward"])[-1] > 0.9
    assert set(data["sampled"]) == {"REINFORCE + SGD", "REINFORCE + Adam"}


def check_lazy_walk(data):
    masked, lazy = (data["reward"][k] for k in ("self masked (default)", "self-loops allowed"))
    assert np.nanmax(np.abs(_arr(masked) - _arr(lazy))) < 1e-6  # same flow, same reward
    lengths = data["expected_length"]
    assert _arr(lengths["self-loops allowed"])[-1] > 2.0 * _arr(lengths["self masked (default)"])[-1]


def test_every_figure_has_a_script():
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_")}
    assert set(FIGURES) <= scripts  # every figure of this file has its script
    assert scripts - set(FIGURES) <= set(NEW_FIGURES), scripts - set(FIGURES) - set(NEW_FIGURES)  # no unknown script
    assert set(cli.figure_names()) == scripts  # and `gradflow figures` finds each by name


@pytest.mark.parametrize("name", [n if n == "emergence" else pytest.param(n, marks=pytest.mark.slow) for n in FIGURES])
def test_figure_quick(name, tmp_path):
    assert cli.main(["figures", name, "--quick", "--out", str(tmp_path)]) == 0
    for ext in ("png", "pdf", "json"):
        path = tmp_path / f"{name}.{ext}"
        assert path.exists() and path.stat().st_size > 0, path
    assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    globals()[f"check_{name}"](data)
    provenance = data["provenance"]  # `gradflow figures` records which script drew it, how and when
    assert provenance["figure"] == name and provenance["mode"] == "quick" and provenance["seconds"] > 0
    assert provenance["script_sha256"] == hashlib.sha256((EXPERIMENTS / f"{name}.py").read_bytes()).hexdigest()
    assert provenance["gradflow_version"] == gf.__version__
    if name == "emergence":  # `gradflow run` draws the same figure (same compiled flow: run it here)
        out = tmp_path / "run" / "emergence.png"
        assert cli.main(["run", "--no-progress", "--t1", "1000", "--figure", str(out)]) == 0
        for ext in ("png", "pdf", "json"):
            assert out.with_suffix(f".{ext}").stat().st_size > 0
        check_emergence(json.loads(out.with_suffix(".json").read_text()))
