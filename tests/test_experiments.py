"""Every figure script runs in --quick mode through ``gradflow figures NAME --quick --out DIR``,
writes NAME.png, .pdf and .json there (never into figures/), and its numbers support the figure's claim.
Every script has the same three parts: a typed preset per mode, a computation, claim checks and a plot."""

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import gradflow as gf
from gradflow import cli
from gradflow._series import first_crossing

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FIGURES = (
    "emergence",
    "simple_examples",
    "scaling",
    "phase_diagram",
    "ood",
    "flow_vs_sampled",
    "lazy_walk",
    "horizon",
    "authors_setting",
    "noise",
    "design",
    "data_window",
    "two_matrix",
)

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
    assert cs[0] == 0.0 and np.all(slow[0] >= slow[cs < 1].max(axis=0))  # hardest only is the slowest holding it
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


def check_horizon(data):
    uncapped, *capped = data["runs"].values()
    assert uncapped["max_len"] is None and [r["max_len"] for r in capped] == [data["n"] + 1, 2 * data["n"]]
    assert uncapped["final_theta"][2] < 0  # the uncapped flow lowers gamma: a lazy walk
    assert np.all(_arr(uncapped["final_stay"])[1:-1] > _arr(uncapped["final_forward_unconditional"])[1:-1])
    for run in capped:
        alpha, beta, gamma = run["final_theta"]
        assert beta < 0 < gamma and np.all(_arr(run["final_forward_unconditional"]) > _arr(run["final_stay"]))
    spread = [r["final_theta"][2] - r["final_theta"][1] for r in capped]
    assert spread[0] > spread[1]  # the tighter cap pushes further
    for run in data["runs"].values():  # P(forward | move) = P(forward) / P(move), and P(move) = 1 - P(stay)
        moved = 1.0 - _arr(run["final_stay"])
        np.testing.assert_allclose(
            _arr(run["final_forward_given_move"]) * moved, _arr(run["final_forward_unconditional"]), rtol=1e-9
        )


def check_authors_setting(data):
    n, exact = data["n"], data["exact"]
    for k in map(str, data["ks"][:-1]):  # no d = 1 start: reach a terminal, not the right one
        hardest = _arr(exact[k]["hardest_reward"])
        assert np.all(hardest <= 0.55) and hardest[-1] >= 0.45 and exact[k]["final"]["hardest_reach"] > 0.95
    last = exact[str(n - 1)]["final"]
    alpha, beta, gamma = last["theta"]
    assert last["hardest_reward"] > 0.9 and alpha > gamma > 0 > beta


def check_two_matrix(data):
    ks, runs = [str(k) for k in data["ks"]], data["runs"]
    self_loop = data["terms"].index("self-loop η·M")
    for values in ("trained", "fixed"):  # both V kinds: only k = 4 (with d = 1) learns the hardest start
        assert _arr(runs[values][ks[-1]]["hardest_reward"])[-1] > 0.9
        assert np.max(_arr(runs[values][ks[0]]["hardest_reward"])) < 0.6
        step = data["summary"][values]["k4_step_0.9"]
        assert step == int(np.argmax(_arr(runs[values][ks[-1]]["hardest_reward"]) >= 0.9))
        sampled = {k: _arr(runs[values][k]["sampled"]["hardest_reward"]) for k in (ks[0], ks[-1])}  # REINFORCE + Adam seeds
        assert np.all(sampled[ks[-1]][:, -1] > 0.9) and np.all(sampled[ks[0]] < 0.6)
    assert all(runs["trained"][k]["final_terms"][self_loop] < 0 for k in ks)  # V trained suppresses self-loops
    assert data["summary"]["trained"]["self_loop_sign"] == -1 and data["summary"]["fixed"]["self_loop_sign"] == 0
    times = _arr(data["escape"]["times"]["trained"])  # the saddle: escape time falls with the start scale
    assert np.all(np.isfinite(times)) and np.all(np.diff(times) < 0)


def check_noise(data):
    small, large = (str(b) for b in data["batches"])
    uniform = data["validation"]["uniform"]
    assert uniform[small]["agree"] and uniform[large]["agree"]
    for entry in (uniform[small], uniform[large]):
        z = entry["z"]["restricted_mean"]
        se = np.hypot(entry["sde"]["restricted_mean_se"], entry["sampled"]["restricted_mean_se"])
        np.testing.assert_allclose(z * se, entry["sde"]["restricted_mean"] - entry["sampled"]["restricted_mean"], rtol=1e-9)
    assert uniform[small]["sde"]["restricted_std"] > 2.0 * uniform[large]["sde"]["restricted_std"]
    per_d = _arr(data["critical_base"]["8"]["per_start"])
    assert np.all(per_d[1:] / per_d[:-1] > 10.0)


def check_design(data):
    for cell in data["cells"]:
        assert cell["reward"] >= cell["target_only_reward"] - 1e-15 and abs(sum(cell["probs"]) - 1) < 1e-9
        if cell["target_only_reward"] < 0.9:
            assert cell["probs"][0] > 0.0
    for curve in data["curricula"]:
        assert curve["reward"] >= curve["mixture_reward"] - 1e-15


def _window(cs, reward, level):
    """The learned range of c (reward >= level), each edge interpolated linearly in its grid cell."""
    learned = np.nonzero(reward >= level)[0]
    if learned.size == 0:
        return None, None
    edge = lambda i, j: cs[i] + (level - reward[i]) * (cs[j] - cs[i]) / (reward[j] - reward[i])
    lo, hi = learned[0], learned[-1]
    return (cs[0] if lo == 0 else edge(lo - 1, lo)), (cs[-1] if hi == cs.size - 1 else edge(hi, hi + 1))


def check_data_window(data):
    cs, level, main = np.asarray(data["cs"], float), data["level"], data["main_setting"]
    for kind in ("exact", "flow"):
        key = main if kind == "exact" else f"t={data['t_match']:g}"
        for family in data["families"]:
            for n in map(str, data["ns"]):
                entry = data[kind][family][n]
                rewards = {k: _arr(v) for k, v in entry["hardest_reward"].items()}
                lower, upper = _window(cs, rewards[key], level)
                assert (lower, upper) == pytest.approx((entry["window"]["lower"], entry["window"]["upper"]), abs=1e-12)
                edges = [_window(cs, r, level) for r in rewards.values()]
                for side, values in zip(("lower", "upper"), zip(*edges)):
                    values = [v for v in values if v is not None]
                    if values:
                        assert entry[f"{side}_spread"] == pytest.approx([min(values), max(values)])
                        assert entry[f"{side}_uncertainty"] >= (max(values) - min(values)) / 2 - 1e-12
                    else:
                        assert entry[f"{side}_spread"] is None
                if kind == "exact":  # within the budget: neither hardest only (c = 0) nor no hardest start (c = 1)
                    assert rewards[key][0] < level and rewards[key][-1] < level
    first = data["exact"][next(iter(data["families"]))][str(data["ns"][0])]["window"]
    assert first["lower"] is not None and 0 < first["lower"] < first["upper"] < 1  # a window, strictly inside (0, 1)
    for points in data["sampled"]["points"].values():
        for point in points.values():
            assert point["mean"] == pytest.approx(np.mean(point["final"])) and len(point["final"]) == data["sampled"]["seeds"]


def test_every_script_has_preset_computation_checks_and_plot():
    """Three parts per script: QUICK and FULL instances of one frozen dataclass, compute, check, draw; main
    runs them through ``gradflow.plotting.run_experiment`` (headless); no mode switch inline."""
    for name in FIGURES:
        module = importlib.import_module(f"experiments.{name}")
        assert dataclasses.is_dataclass(module.QUICK) and type(module.QUICK) is type(module.FULL), name
        assert type(module.QUICK).__dataclass_params__.frozen, name
        assert all(callable(getattr(module, part)) for part in ("compute", "check", "draw", "main")), name
        source = (EXPERIMENTS / f"{name}.py").read_text()
        assert "run_experiment(" in source and "args.quick" not in source, name


def test_data_window_edges_and_digits():
    from experiments import data_window

    cs = np.linspace(0.0, 1.0, 11)
    reward = np.array([0.5, 0.5, 0.5, 0.7, 0.95, 0.99, 0.99, 0.95, 0.92, 0.5, 0.0])
    w = data_window.window(cs, reward, 0.9)
    assert w["lower"] == pytest.approx(0.3 + 0.1 * 0.2 / 0.25) and w["upper"] == pytest.approx(0.8 + 0.1 * 0.02 / 0.42)
    assert w["lower_bracket"] == pytest.approx([0.3, 0.4]) and w["segments"] == 1
    assert data_window.window(cs, np.full(11, 0.5), 0.9)["lower"] is None
    assert data_window.window(cs, np.where(np.arange(11) % 4 == 1, 1.0, 0.0), 0.9)["segments"] == 3
    assert data_window.rounded(0.3123, 0.05) == "0.31 ± 0.05" and data_window.rounded(0.3123, 0.2) == "0.3 ± 0.2"
    sens = data_window.edges_with_sensitivity(cs, {"a": reward, "b": np.roll(reward, 1)}, "a", 0.9)
    assert sens["lower_spread"] == pytest.approx([w["lower"], w["lower"] + 0.1]) and sens["lower_uncertainty"] == pytest.approx(
        0.05
    )
    assert sens["lower_knife_edge"] is False and sens["by_setting"]["b"]["lower"] == pytest.approx(w["lower"] + 0.1)


def test_every_figure_has_a_script():
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_")}
    assert set(FIGURES) == scripts  # every script is a figure of this file
    assert set(cli.figure_names()) == scripts  # and `gradflow figures` finds each by name


@pytest.mark.parametrize("name", [n if n == "emergence" else pytest.param(n, marks=pytest.mark.slow) for n in FIGURES])
def test_figure_quick(name, tmp_path, monkeypatch):
    assert cli.main(["figures", name, "--quick", "--out", str(tmp_path)]) == 0
    for ext in ("png", "pdf", "json"):
        path = tmp_path / f"{name}.{ext}"
        assert path.exists() and path.stat().st_size > 0, path
    assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    globals()[f"check_{name}"](data)  # the claim, recomputed here from the JSON
    assert importlib.import_module(f"experiments.{name}").check(data) == data["claim"]["failures"] == []  # and by the script
    assert data["preset"]["mode"] == "quick"
    provenance = data["provenance"]  # `gradflow figures` records which script drew it, how and when
    assert provenance["figure"] == name and provenance["mode"] == "quick" and provenance["seconds"] > 0
    assert provenance["script_sha256"] == hashlib.sha256((EXPERIMENTS / f"{name}.py").read_bytes()).hexdigest()
    assert provenance["gradflow_version"] == gf.__version__
    if name == "emergence":  # `gradflow run` draws the same figure (same compiled flow: run it here), into runs/
        monkeypatch.chdir(tmp_path)
        assert cli.main(["run", "--no-progress", "--t1", "1000"]) == 0
        out = tmp_path / cli.RUN_FIGURE
        assert out.parent.name == "runs" and not (tmp_path / "figures").exists()  # never over the committed figures
        for ext in ("png", "pdf", "json"):
            assert out.with_suffix(f".{ext}").stat().st_size > 0
        check_emergence(json.loads(out.with_suffix(".json").read_text()))


@pytest.mark.parametrize("name", FIGURES)
def test_committed_figure_is_current(name):
    """Every committed figure was drawn in full mode by the script as it is now, and its claim holds in its JSON."""
    folder = EXPERIMENTS.parent / "figures"
    for ext in ("png", "pdf", "json"):
        assert (folder / f"{name}.{ext}").stat().st_size > 0
    data = json.loads((folder / f"{name}.json").read_text())
    provenance = data["provenance"]
    assert provenance["figure"] == name and provenance["mode"] == "full" == data["preset"]["mode"]
    assert provenance["script_sha256"] == hashlib.sha256((EXPERIMENTS / f"{name}.py").read_bytes()).hexdigest(), (
        f"figures/{name} was drawn by another version of experiments/{name}.py: run `gradflow figures {name}`"
    )
    assert data["claim"]["holds"] and importlib.import_module(f"experiments.{name}").check(data) == []
