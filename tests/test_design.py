"""Data design (gradflow.design): gradients through the flow, optimal mixtures and curricula, CLI, figure.

Every optimisation of one structure (n, family, batch) shares one compilation (a second-order solve:
tens of seconds), so the default tests use n = 4 with the default batch of 3 restarts and share it;
the gradient check in the other parameters (its own compilation), the n = 8 curriculum check of the
issue and the figure's quick run are marked slow.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import ChainTask, ModelSpec, Theta, design
from gradflow import schedules as S
from gradflow.flow import FlowParams

N = 4
BUDGET = 5.0


def _members_around(params, step):
    """params +- step along each logit (central differences)."""
    out = []
    for k in range(params["logits"].size):
        for sign in (1.0, -1.0):
            logits = params["logits"].copy().reshape(-1)
            logits[k] += sign * step
            out.append({"logits": logits.reshape(params["logits"].shape), "switch": params["switch"]})
    return out


@pytest.mark.slow
def test_target_reward_gradient_matches_finite_differences():
    """d J_target(theta(T)) / d (training probs of a schedule, its switch time, theta0, tau) against
    central differences of re-solved flows (relative 1e-4)."""
    target = ChainTask.hardest(N)
    base = FlowParams(target, ModelSpec(), Theta(0.3, 0.0, 0.0), t1=BUDGET)
    after = np.asarray(target.start_probs)

    def reward(x):
        fp = eqx.tree_at(lambda f: (f.theta0.alpha, f.theta0.gamma, f.model.tau), base, (x["alpha"], x["gamma"], x["tau"]))
        schedule = S.Step(x["switch"], x["probs"], after)
        return design.target_reward(fp, target, BUDGET, schedule=schedule)

    x0 = {"alpha": 0.3, "gamma": 0.0, "tau": 0.2, "switch": 1.3, "probs": np.array([0.5, 0.3, 0.2])}
    x0 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype=float), x0)
    value_and_grad = jax.jit(jax.value_and_grad(reward))  # one compilation for the gradient and the values
    grads = value_and_grad(x0)[1]
    value = lambda x: value_and_grad(x)[0]
    for name, size in [("alpha", 1), ("gamma", 1), ("tau", 1), ("switch", 1), ("probs", 3)]:
        for k in range(size):
            h = 1e-5
            unit = np.zeros(size)
            unit[k] = h
            shift = lambda s: {**x0, name: x0[name] + (s * unit if size > 1 else s * h)}
            fd = (value(shift(1.0)) - value(shift(-1.0))) / (2 * h)
            exact = np.ravel(grads[name])[k]
            assert abs(exact - fd) <= 1e-4 * abs(fd) + 1e-10, (name, k, exact, fd)
    assert float(value(x0)) > 0.5


@pytest.fixture(scope="module")
def mixture():
    return design.optimal_mixture(ChainTask.hardest(N), BUDGET, steps=12)


def test_optimal_mixture_beats_every_row_and_is_a_distribution(mixture):
    assert mixture.probs.shape == (N - 1,)
    assert np.all(mixture.probs >= 0) and abs(mixture.probs.sum() - 1) < 1e-12
    names = [row["name"] for row in mixture.rows]
    assert names[:2] == ["target itself", "uniform"] and names[2].startswith("best mixture")
    assert len(mixture.rows[2]["grid"]["c"]) >= 64
    for row in mixture.rows:
        assert mixture.reward >= row["reward"] - 1e-15, row["name"]
    # the reported reward is the reward of the reported distribution
    again = design.reward_of(mixture.probs, ChainTask.hardest(N), BUDGET)
    assert abs(again - mixture.reward) < 1e-9
    history = np.asarray(mixture.history["constant"]["rewards"])
    assert history.shape[1] == 3 and np.nanmax(history) <= mixture.reward + 1e-15


def test_batched_gradients_match_finite_differences(mixture):
    """The optimiser's gradients (vmapped value_and_grad over restarts, logits through a softmax)
    against central differences of re-solved flows (relative 1e-4)."""
    target = ChainTask.hardest(N)
    base = design._base_params(target, BUDGET, ModelSpec(), None, "tsit5", 1e-8, 1e-10, design.DEFAULT_MAX_STEPS, "reduced", None)
    problem = design._Problem("constant", np.zeros(0), base, target, BUDGET, np.inf, "recursive", 3)
    params = design._params(np.array([0.4, -0.2, 0.1]))
    _, grads = problem(design._stack([params] * 3))
    h = 1e-5
    values = problem.rewards(_members_around(params, h))
    fd = (values[0::2] - values[1::2]) / (2 * h)
    np.testing.assert_allclose(np.asarray(grads["logits"])[0].ravel(), fd, rtol=1e-4, atol=1e-10)


def test_save_and_load_round_trip(mixture, tmp_path):
    path = mixture.save(tmp_path / "mix")
    record = json.loads(path.read_text())
    assert record["config"]["t_budget"] == BUDGET and "jax" in record["versions"]
    back = design.DesignResult.load(path)
    np.testing.assert_array_equal(back.probs, mixture.probs)
    assert back.reward == mixture.reward and back.rows == json.loads(json.dumps(mixture.rows))


def test_mean_easy_mass_constraint_is_exact():
    target = ChainTask.hardest(N)
    result = design.optimal_mixture(target, BUDGET, steps=6, mean_easy_mass=0.05)
    assert design.off_target_mass(result.probs, np.asarray(target.start_probs)) <= 0.05 + 1e-12
    assert not next(r for r in result.rows if r["name"] == "uniform")["feasible"]
    assert result.reward >= result.best_row()["reward"]


def test_validation():
    target = ChainTask.hardest(N)
    fp = FlowParams(ChainTask.uniform(N + 1))
    with pytest.raises(ValueError, match="target must have"):
        design.target_reward(fp, target, 1.0)
    with pytest.raises(ValueError, match="t_budget"):
        design.target_reward(FlowParams(target), target, -1.0)
    with pytest.raises(ValueError, match="mean_easy_mass"):
        design.optimal_mixture(target, 1.0, mean_easy_mass=2.0)
    with pytest.raises(ValueError, match="families"):
        design.optimal_curriculum(target, 1.0, families=("spline",))
    with pytest.raises(ValueError, match="adjoint"):
        design.flow_theta(fp, 1.0, adjoint="magic")


def test_cli_design_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "d.json"
    code = gradflow.cli.main(
        [
            "design",
            "--n",
            str(N),
            "--budget",
            str(BUDGET),
            "--steps",
            "2",
            "--out",
            str(out),
            "--schedule",
            "step:t=0.5,before=easiest,after=hardest",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "optimal mixture" in text and "target itself" in text and "given schedule" in text
    record = json.loads(out.read_text())
    assert record["kind"] == "mixture" and len(record["probs"]) == N - 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--n", "2"],
        ["--budget", "-1"],
        ["--target", "d9"],
        ["--mean-easy-mass", "2"],
        ["--max-mean-easy-mass", "2"],
        ["--schedule", "spline:1"],
        ["--tau", "0"],
        ["--curriculum", "0"],
    ],
)
def test_cli_design_bad_values_exit_nonzero(argv, capsys):
    assert gradflow.cli.main(["design", "--n", str(N), "--steps", "0"] + argv) != 0
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_curriculum_beats_the_fixed_mixture_issue_example():
    """Issue 16: n = 8, tau 0.2, theta0 (0.3, 0, 0), budget 2.5, hardest target, mean easy mass 0.1:
    all easy mass first then hardest reached 0.974 against 0.616 for the fixed mixture."""
    result = design.optimal_curriculum(ChainTask.hardest(8), 2.5, knots=4, mean_easy_mass=0.1, steps=30, families=("step",))
    assert result.mixture_reward == pytest.approx(0.616, abs=1e-3)
    assert result.reward >= 0.9737
    assert result.gain > 0.35
    for row in result.rows:
        if row["feasible"]:
            assert result.reward >= row["reward"] - 1e-15
    mean = result.schedule.mean_probs(0.0, 2.5)
    assert 1.0 - float(mean[-1]) <= 0.1 + 1e-9


@pytest.mark.slow
def test_figure_quick_run_and_claims(tmp_path):
    assert gradflow.cli.main(["figures", "design", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "design.json").read_text())
    for cell in data["cells"]:
        assert cell["reward"] >= cell["target_only_reward"] - 1e-15
        assert abs(sum(cell["probs"]) - 1) < 1e-9
        # simple examples: the optimum puts mass on d = 1 whenever the target alone is stuck
        if cell["target_only_reward"] < 0.9:
            assert cell["probs"][0] > 0.0
    for curve in data["curricula"]:
        assert curve["reward"] >= curve["mixture_reward"] - 1e-15
