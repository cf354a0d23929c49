"""Failures that name their config (issue 23, items 3, 4, 6 and 7).

A NaN or infinite reward or gradient raises (or, in a batch, is reported) naming the config, the time
or step and theta; ``simulate_many(..., on_error="report")`` keeps every good result; reward levels above
the model's reward ceiling warn, and a ``stop_at`` that can never fire is refused before solving; the
smaller inputs (levels, keys, lr, seeds, schedule specs, executor parameters, result files, the cache
folder) each fail at once with a message naming the field or file.  Small n and few steps throughout.
"""

import json
import os
import subprocess
import sys
import time
import types
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow as gf
from gradflow import ceilings, design, noise, schedules, sweep, theory, training
from gradflow.flow import FlowParams, SolveFailure, check_levels, hitting_times, simulate, simulate_many

SELF_LOOPS = gf.ModelSpec(mask_self=False)
NAN_THETA = gf.Theta(46.2, 46.2, -46.2)  # n = 8, self-loops allowed, tau = 0.2: J is NaN before issue 23 item 2
SOFTMAX = gf.ModelSpec(attention="softmax")


def _nan_schedule(t):
    """A training distribution that is NaN at every time: grad J is NaN everywhere (a forced NaN field)."""
    return jnp.full(2, jnp.nan) + 0.0 * t


@pytest.fixture
def float64_only(monkeypatch):
    """Flows and training without the extended re-run (``extended_config`` gives None): NAN_THETA's float64
    NaN then reaches the checks, as any NaN the extended numbers cannot mend would."""
    for module in (gf.flow, training):
        monkeypatch.setattr(module, "extended_config", lambda params: None)


# --------------------------------------------------------------------------------------------------
# 3. A NaN never passes silently
# --------------------------------------------------------------------------------------------------


def test_simulate_raises_at_a_nan_reward_naming_config_time_and_theta(float64_only):
    params = FlowParams(gf.ChainTask.uniform(8), SELF_LOOPS, NAN_THETA, t1=10.0, save_ts=[0.0, 10.0], events=(), readouts=False)
    with pytest.raises(RuntimeError) as info:
        simulate(params)
    message = str(info.value)
    assert sweep.config_hash(params) in message
    assert "reward J is not finite" in message and "t=0" in message and "46.2" in message


def test_gradient_descent_raises_at_a_nan_reward(float64_only):
    params = FlowParams(gf.ChainTask.uniform(8), SELF_LOOPS, NAN_THETA)
    with pytest.raises(RuntimeError, match=r"gradient_descent: config [0-9a-f]{16} .*step 0, t = 0.*46\.2"):
        training.gradient_descent(params, lr=0.1, steps=3)


@pytest.mark.slow
def test_a_nan_gradient_raises_in_training():
    """Forced: a schedule whose distribution is NaN makes grad J NaN while J on the task stays finite
    (the flow's version: tests/test_flow.py::test_a_nan_vector_field_is_reported_as_such)."""
    params = FlowParams(gf.ChainTask.uniform(3), schedule=_nan_schedule)
    with pytest.raises(RuntimeError, match=r"gradient_descent: .*the gradient is not finite .* at step 0, t = 0, theta = \[0\.3"):
        training.gradient_descent(params, lr=0.1, steps=3)


@pytest.mark.slow
def test_a_flow_that_is_nan_in_float64_is_solved_again_in_extended_numbers():
    """n = 3, Theta(35.6, 0, -35.6), self-loops (the issue's NaN gradient): float64's vector field is NaN at
    theta0, so the flow is solved again with ModelSpec(numbers="extended"); the trajectory keeps its config."""
    params = FlowParams(gf.ChainTask.uniform(3), SELF_LOOPS, gf.Theta(35.6, 0.0, -35.6), t1=1.0, save_ts=[0.0, 1.0])
    params = params.replace(events=(), readouts=False)
    trajectory = simulate(params)
    assert trajectory.stats["numbers"] == "extended" and trajectory.config.model.numbers == "float64"
    assert np.all(np.isfinite(trajectory.reward)) and np.all(np.isfinite(trajectory.theta))


@pytest.mark.slow
def test_only_the_nan_members_of_a_batch_and_of_training_are_run_again_in_extended_numbers():
    good = FlowParams(gf.ChainTask.uniform(8), SELF_LOOPS, gf.Theta(0.3, 0.1, -0.2), t1=1.0, save_ts=[0.0, 1.0])
    bad = good.replace(theta0=NAN_THETA)
    results = simulate_many([good.replace(events=(), readouts=False), bad.replace(events=(), readouts=False)])
    assert [r.stats.get("numbers") for r in results] == [None, "extended"] and results[1].stats["batch"] == 1
    assert results[1].reward[0] == pytest.approx(0.7278911564625851, rel=1e-12)  # the mpmath reference
    runs = training.gradient_descent_many([good, bad], lrs=0.1, steps=3)
    assert [r.stats["numbers"] for r in runs] == ["float64", "extended"] and np.all(np.isfinite(runs[1].reward))
    assert training.gradient_descent(bad, lr=0.1, steps=3).reward[0] == pytest.approx(0.7278911564625851, rel=1e-12)


def test_failure_message_reports_a_nan_reward_even_when_the_solver_succeeded():
    """The check is on the host: a successful solve whose saved reward is NaN fails, naming the save and theta."""
    params = FlowParams(gf.ChainTask.uniform(3), t1=1.0)
    out = types.SimpleNamespace(
        ts=np.array([0.0, 1.0, np.nan]),
        reward=np.array([0.5, 0.6, np.nan]),
        theta=np.array([[0.3, 0, 0, 0, 0], [0.4, 0, 0, 0, 0], [np.nan] * 5]),
        t_stop=1.0,
        theta_stop=np.array([0.4, 0, 0, 0, 0]),
        num_steps=7,
        num_accepted_steps=7,
        num_rejected_steps=0,
        success=True,
        field_finite=True,
        result=0,
    )
    assert gf.flow.failure_message(params, out) is None  # NaN after the last save time is padding, not a failure
    out.reward = np.array([0.5, np.inf, np.nan])
    message = gf.flow.failure_message(params, out)
    assert "reward J is not finite (inf) at save 1, t=1 (the solve took 7 steps), theta = [0.4, 0.0" in message
    out.reward, out.field_finite = np.array([0.5, 0.6, np.nan]), False
    assert "vector field grad J is not finite (NaN or inf) at t=1 after 7 steps" in gf.flow.failure_message(params, out)


# --------------------------------------------------------------------------------------------------
# 4. Batches that keep what worked, and never hang
# --------------------------------------------------------------------------------------------------


def _mixed_group(**kwargs):
    """The issue's group: one member needs vastly more steps than the rest (t1 = 1e8 with max_steps 40)."""
    return [FlowParams(gf.ChainTask.uniform(4), t1=t, max_steps=40, **kwargs) for t in (1.0, 2.0, 1e8)]


def _check_reported(configs, results):
    assert [type(r).__name__ for r in results] == ["Trajectory", "Trajectory", "SolveFailure"]
    failure = results[2]
    assert isinstance(failure, SolveFailure) and failure.index == 2
    assert failure.config_hash == sweep.config_hash(configs[2])
    assert "ran out of steps" in failure.reason and "t1=1e+08" in failure.reason
    assert results[0].stats["run_seconds"] < 10  # the batch stops at max_steps: no hang
    return failure


def test_simulate_many_reports_the_member_that_ran_out_and_keeps_the_others():
    configs = _mixed_group(save_ts=None, events=(), readouts=False)
    configs = [c.replace(save_ts=[0.0, float(c.t1)]) for c in configs]
    failure = _check_reported(configs, simulate_many(configs, on_error="report"))
    with pytest.raises(RuntimeError, match=rf"configs\[2\] \(config {failure.config_hash} \(n = 4.*ran out of steps"):
        simulate_many(configs)
    with pytest.raises(ValueError, match="on_error"):
        simulate_many(configs, on_error="ignore")


@pytest.mark.slow
def test_the_issue_group_with_default_saves_and_events():
    configs = _mixed_group()
    results = simulate_many(configs, on_error="report")
    _check_reported(configs, results)
    np.testing.assert_allclose(results[1].reward[-1], simulate(configs[1]).reward[-1], rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# 6. Ceilings everywhere
# --------------------------------------------------------------------------------------------------


def test_theory_reexports_the_ceilings():
    assert theory.max_reward is ceilings.max_reward and theory.reward_ceiling is ceilings.reward_ceiling
    assert theory.reward_ceiling_warning is ceilings.reward_ceiling_warning


def test_a_stop_at_above_the_ceiling_is_refused_when_built():
    """Issue 23.6: the event could never fire, so the config is refused at construction, naming the field."""
    with pytest.raises(ValueError, match=r"stop_at='converged' can never fire.*ceiling sup J = 0\.95"):
        FlowParams(gf.ChainTask.uniform(4), SOFTMAX, stop_at="converged")  # ceiling 0.95 < 0.999
    with pytest.raises(ValueError, match=r"stop_at='threshold' can never fire.*ceiling sup J = 0\.875.*max_len = 3"):
        FlowParams(gf.ChainTask.uniform(2), gf.ModelSpec(max_len=3, mask_self=False), reward_threshold=0.9, stop_at="threshold")
    reachable = FlowParams(gf.ChainTask.uniform(4), SOFTMAX, reward_threshold=0.5, stop_at="threshold")
    with pytest.raises(ValueError, match="stop_at='threshold' can never fire"):
        reachable.replace(reward_threshold=0.97)
    assert reachable.replace(reward_threshold=0.94).reward_threshold == 0.94


def test_a_stop_at_set_without_building_is_refused_before_solving(monkeypatch):
    monkeypatch.setattr(gf.flow, "compiled", lambda *a, **k: pytest.fail("compiled despite an event that cannot fire"))
    built = FlowParams(gf.ChainTask.uniform(4), SOFTMAX, convergence_loss=0.5, stop_at="converged")
    params = eqx.tree_at(lambda p: p.recording.convergence_loss, built, jnp.asarray(1e-3))  # no construction check
    for run in (simulate, gf.solve, lambda p: simulate_many([p]), lambda p: hitting_times([p])):
        with pytest.raises(ValueError, match=r"stop_at='converged' can never fire.*ceiling sup J = 0\.95"):
            run(params)
    with pytest.raises(ValueError, match=r"configs\[1\]"):
        simulate_many([built, params])


def test_a_recorded_level_above_the_ceiling_warns():
    params = FlowParams(gf.ChainTask.uniform(4), SOFTMAX, events=("converged",))
    with pytest.warns(UserWarning, match="converged event: reward level 0.999 is above the reward ceiling"):
        check_levels(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_levels(FlowParams(gf.ChainTask.uniform(4), SOFTMAX, reward_threshold=0.5, events=("threshold",)))
        check_levels(FlowParams(gf.ChainTask.uniform(4)))  # linear attention: ceiling 1, nothing to check
        check_levels(FlowParams(gf.ChainTask.uniform(4), gf.ModelSpec(attention="softmax", max_len=3)))  # numerical: skipped


def test_simulate_and_solve_check_the_levels_before_compiling(monkeypatch):
    class Compiling(Exception):
        pass

    def compiling(*args, **kwargs):
        raise Compiling

    monkeypatch.setattr(gf.flow, "compiled", compiling)
    monkeypatch.setattr(gf.flow, "compiled_in_turn", compiling)
    params = FlowParams(gf.ChainTask.uniform(3), SOFTMAX, events=("converged",))
    for run in (simulate, gf.solve, lambda p: simulate_many([p]), lambda p: gf.flow.solve_many([p])):
        with pytest.warns(UserWarning, match="reward ceiling"), pytest.raises(Compiling):
            run(params)
    stopping = params.replace(stop_at="threshold", reward_threshold=0.5)  # it can fire; the converged event cannot
    with pytest.warns(UserWarning, match="converged event: reward level 0.999"), pytest.raises(Compiling):
        hitting_times([stopping])


def test_learning_time_above_the_ceiling_is_none_with_a_warning():
    """learning_time stops on the watched task's reward itself (no stop_at), so a level above the training
    task's ceiling is answered None with a warning, while an eval task with a higher ceiling is still timed."""
    with pytest.warns(UserWarning, match="ceiling"):
        assert theory.learning_times([gf.ChainTask.uniform(4)], SOFTMAX, level=0.999) == [None]
    two = gf.ModelSpec(max_len=3, mask_self=False)  # n = 2: sup J = 7/8 < 0.9, every token moves with probability <= 1/2
    with pytest.warns(UserWarning, match="ceiling"):
        (times,) = theory.learning_times([gf.ChainTask.uniform(2)], two, level=0.9, eval_tasks={"same": gf.ChainTask.uniform(2)})
    assert times.train is None and times.eval["same"] is None


def test_the_ceiling_check_costs_microseconds_once_cached():
    params = FlowParams(gf.ChainTask.uniform(5), SOFTMAX, reward_threshold=0.5, events=("threshold",))
    check_levels(params)  # the first call evaluates the closed form
    start = time.perf_counter()
    for _ in range(100):
        check_levels(params)
    assert (time.perf_counter() - start) / 100 < 2e-3


# --------------------------------------------------------------------------------------------------
# 7. The smaller cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(level=1.5), "level"),
        (dict(level=float("nan")), "level"),
        (dict(keys=jnp.zeros((0, 2), dtype=jnp.uint32)), "keys"),
        (dict(keys=jax.random.split(jax.random.key(0), 0)), "keys"),
    ],
    ids=["level 1.5", "level nan", "zero raw keys", "zero typed keys"],
)
def test_simulate_sgd_rejects_bad_levels_and_zero_keys(kwargs, needle):
    kwargs = {"keys": jax.random.split(jax.random.key(0), 2), **kwargs}
    with pytest.raises(ValueError, match=needle):
        noise.simulate_sgd(FlowParams(gf.ChainTask.uniform(3), t1=1.0), lr=0.1, batch=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs, needle", [(dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"), (dict(seed=-1), "seed")]
)
def test_design_rejects_bad_search_settings_at_once(kwargs, needle):
    for fn in (design.optimal_mixture, lambda *a, **k: design.optimal_curriculum(a[0], a[1], 2, **k)):
        with pytest.raises(ValueError, match=needle):
            fn(gf.ChainTask.hardest(4), 10.0, **kwargs)


def test_schedule_specs_refuse_repeated_keys_and_non_strings():
    with pytest.raises(ValueError, match="'t' is given twice"):
        schedules.schedule_from_spec("step:t=1,t=2,before=easiest,after=hardest", 8)
    with pytest.raises(ValueError, match="spec string"):
        schedules.schedule_from_spec(None, 8)
    assert schedules.schedule_from_spec("step:t=1,before=easiest,after=hardest", 8).to_dict()["kind"] == "step"


def test_unknown_executor_parameters_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'nosuch_param'.*timeout_min"):
        sweep.check_executor_params("local", {"nosuch_param": 1})
    with pytest.raises(ValueError, match="'nosuch_param'"):
        sweep.make_executor("local", tmp_path, nosuch_param=1)
    with pytest.raises(ValueError, match="'partition'"):
        sweep.check_executor_params("slurm", {"partition": "gpu"})  # Slurm's own names carry the slurm_ prefix
    sweep.check_executor_params("local", {"timeout_min": 5})
    sweep.check_executor_params("slurm", {"timeout_min": 5, "slurm_partition": "gpu"})


def test_a_garbage_npz_names_the_file(tmp_path):
    path = tmp_path / "result.npz"
    path.write_bytes(b"this is not a zip archive at all")
    path.with_suffix(".json").write_text(
        json.dumps({"config": FlowParams(gf.ChainTask.uniform(3)).to_dict(), "events": {}, "stats": {}})
    )
    with pytest.raises(ValueError, match=f"{path}: cannot be read as a gradflow result"):
        gf.Trajectory.load(path)
    assert sweep.load_result(path) is None


def test_a_cache_folder_that_is_a_file_warns_naming_it(tmp_path):
    a_file = tmp_path / "cache_is_a_file"
    a_file.write_text("")
    env = {**os.environ, "GRADFLOW_CACHE_DIR": str(a_file)}
    env.pop("GRADFLOW_NO_CACHE", None)
    probe = "import gradflow.compile_cache as c; print(c.enable_persistent_cache())"
    result = subprocess.run([sys.executable, "-W", "always", "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert f"GRADFLOW_CACHE_DIR {str(a_file)!r} cannot be used" in result.stderr


def test_expected_loss_with_a_cap_is_the_capped_loss():
    theta, task, model = gf.Theta(4.0, -2.0, -3.0), gf.ChainTask.uniform(4), gf.ModelSpec(max_len=8)
    loss = float(gf.expected_loss(theta, task, model))
    assert loss == float(gf.capped.expected_loss(theta, task, model)) and 0.0 < loss < 1e-3


@pytest.mark.slow
def test_learning_time_raises_at_a_nan_reward(float64_only):
    with pytest.raises(RuntimeError, match=r"learning_time: config [0-9a-f]{16} \(n = 8.*reward J is not finite"):
        theory.learning_time(gf.ChainTask.uniform(8), SELF_LOOPS, NAN_THETA, t1=10.0, max_steps=50)


@pytest.mark.slow
def test_a_solve_that_needs_many_steps_says_so_early(monkeypatch):
    """A solve first runs EARLY_STEPS steps: past them it raises at once when even the fewest steps t1 can
    need (uniform in log t) exceed max_steps, and otherwise warns and solves again in full."""
    monkeypatch.setattr(gf.flow, "EARLY_STEPS", 32)  # the default flow takes about 97 steps
    params = FlowParams(gf.ChainTask.uniform(8))
    with pytest.warns(UserWarning, match=r"after 32 steps \(.* steps/s\) the flow solve has reached t=.* of t1=10000"):
        trajectory = simulate(params)
    np.testing.assert_array_equal(trajectory.theta, np.asarray(gf.flow.solve(params).theta))  # the full solve's result
    assert trajectory.stats["num_steps"] > 32
    with pytest.raises(RuntimeError, match=r"t1 needs .* steps \(uniform in t\), more than max_steps=40"):
        simulate(params.replace(max_steps=40))
    hopeless, quick = simulate_many([params.replace(max_steps=40), params.replace(t1=1.0, max_steps=40)], on_error="report")
    assert isinstance(hopeless, SolveFailure) and hopeless.index == 0 and "more than max_steps=40" in hopeless.reason
    assert isinstance(quick, gf.Trajectory) and quick.stats["num_steps"] <= 32
