"""The gradient-flow simulator: accuracy, predicted shape, coordinates, schedules, batching, I/O."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import solver_params

import gradflow as gf
import gradflow.compile_cache as compile_cache
from gradflow import schedules
from gradflow.flow import (
    FlowParams,
    Numerics,
    Problem,
    Recording,
    Solution,
    Trajectory,
    compilation_count,
    hitting_times,
    simulate,
    simulate_many,
    solve,
    solve_many,
    stack_configs,
)

N = 6
TASK = gf.ChainTask.uniform(N)


def _rk4(vector_field, y0, t1, dt):
    """Fixed-step classical Runge-Kutta from t = 0, independent of diffrax; returns y at multiples of dt."""

    def step(y, t):
        k1 = vector_field(t, y)
        k2 = vector_field(t + dt / 2, y + dt / 2 * k1)
        k3 = vector_field(t + dt / 2, y + dt / 2 * k2)
        k4 = vector_field(t + dt, y + dt * k3)
        y_next = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y_next, y_next

    steps = int(round(t1 / dt))
    _, ys = jax.lax.scan(step, y0, dt * jnp.arange(steps))
    return jnp.concatenate([y0[None], ys])


@pytest.mark.slow
def test_trajectory_matches_fixed_step_rk4():
    save_ts = jnp.array([0.0, 0.5, 1.0, 2.0, 5.0, 10.0])
    params = FlowParams(TASK, t1=10.0, save_ts=save_ts)
    trajectory = simulate(params, progress=False)
    grad = jax.jit(lambda t, y: jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), TASK, gf.ModelSpec()))(y))
    dt = 2e-3
    reference = _rk4(grad, params.theta0.as_array(), 10.0, dt)[np.round(np.asarray(save_ts) / dt).astype(int)]
    error = np.max(np.abs(trajectory.theta - reference))
    assert error < 1e-6, f"max |theta - RK4| = {error:.2e}"


@pytest.mark.parametrize("solver", solver_params())
def test_default_preset_learns_forward_traversal(solver):
    trajectory = simulate(FlowParams(gf.ChainTask.uniform(8), t1=100.0, solver=solver), progress=False)
    assert trajectory.reward[0] < 0.6 and trajectory.reward[-1] >= 0.999, f"J: {trajectory.reward[0]} -> {trajectory.reward[-1]}"
    assert np.all(np.diff(trajectory.theta[:, 0]) > 0), "alpha must increase along the flow"
    assert np.all(np.diff(trajectory.theta[:, 2]) < 0), "gamma must decrease along the flow"
    assert np.all(np.diff(trajectory.reward) >= -1e-12), "reward is a Lyapunov function of gradient ascent"
    assert abs(trajectory.events["reward_threshold"] - 1.465) < 0.01, trajectory.events


def test_full_coordinates_divide_the_rate_by_orbit_sizes():
    params = FlowParams(TASK, model=gf.ModelSpec("softmax", n_isolated=2), coords="full")
    reduced = FlowParams(TASK, model=gf.ModelSpec("softmax", n_isolated=2))
    y = jnp.array([0.4, -0.2, 0.1, 0.3, -0.1])
    big_n = 2 * N + 2
    orbit = np.array([big_n - 1, big_n - 1, (big_n - 1) * (big_n - 2), 1, big_n - 1])
    np.testing.assert_allclose(params.vector_field(0.0, y), reduced.vector_field(0.0, y) / orbit, rtol=1e-14)
    bigger = FlowParams(TASK, coords="full", n_vocab=30)
    np.testing.assert_allclose(bigger.orbit_sizes(), [29, 29, 29 * 28, 1, 29])


@pytest.mark.slow
def test_constant_schedule_equals_fixed_distribution():
    mixture = gf.ChainTask.mixture(N, 0.3)

    def constant(t):
        return mixture.start_probs

    scheduled = simulate(FlowParams(TASK, schedule=constant, t1=50.0), progress=False)
    fixed = simulate(FlowParams(mixture, t1=50.0), progress=False)
    np.testing.assert_allclose(scheduled.theta, fixed.theta, atol=1e-10)
    # the schedule drives training; the reported reward is on the evaluation task (uniform)
    expected = [gf.expected_reward(gf.Theta.from_array(x), TASK, gf.ModelSpec()) for x in scheduled.theta[::50]]
    np.testing.assert_allclose(scheduled.reward[::50], expected, atol=1e-12)


def test_simulate_many_compiles_once_and_matches_single_runs(empty_compile_cache):
    configs = [
        FlowParams(gf.ChainTask.mixture(N, c), theta0=gf.Theta(a, 0.0, 0.0), t1=t1, rtol=1e-9)
        for c, a, t1 in [(0.1, 0.3, 1e3), (0.5, 0.1, 1e2), (1.0, 0.5, 1e4)]
    ]
    before = compilation_count()
    batch = simulate_many(configs)
    assert compilation_count() == before + 1, "a batch of one structure must compile once"
    simulate_many(configs[::-1])
    assert compilation_count() == before + 1, "new numbers of the same structure must not recompile"
    for config, batched in zip(configs, batch):
        single = simulate(config, progress=False)
        for name in Trajectory.ARRAYS:
            np.testing.assert_allclose(getattr(batched, name), getattr(single, name), atol=1e-8, err_msg=name)
        assert batched.events["reward_threshold"] == pytest.approx(single.events["reward_threshold"], abs=1e-8)


def test_changing_numbers_does_not_recompile():
    simulate(FlowParams(TASK, t1=20.0), progress=False)
    before = compilation_count()
    simulate(
        FlowParams(gf.ChainTask.hardest(N), gf.ModelSpec(tau=0.3), gf.Theta(0.1, 0.2, -0.1), t1=7.0, rtol=1e-7), progress=False
    )
    assert compilation_count() == before


@pytest.mark.parametrize("solver", solver_params())
def test_t_hit_is_a_root_of_the_reward(solver):
    """J at t_hit(level), solved again from t0 to that time, is the level.  The two solves step apart, so they differ by
    the solver's global error: at tolerances 100x tighter than the defaults it is far below the bound for every
    solver (at the defaults Kvaerno5's reached 1.8e-7)."""
    tight = {"rtol": 1e-10, "atol": 1e-12}
    params = FlowParams(TASK, t1=100.0, solver=solver, **tight)
    trajectory = simulate(params, progress=False)
    for level in (0.7, 0.95):
        t = trajectory.t_hit(level)
        at_t = simulate(FlowParams(TASK, t1=t, solver=solver, **tight), progress=False).reward[-1]  # the program above
        assert abs(at_t - level) < 1e-7, f"J(t_hit({level})) = {at_t}"
    assert trajectory.t_hit(1 - 1e-12) is None


def test_stop_at_threshold_and_events():
    stopped = simulate(FlowParams(TASK, stop_at="threshold", t1=1e4), progress=False)
    full = simulate(FlowParams(TASK, t1=1e4), progress=False)
    assert stopped.events["reward_threshold"] == pytest.approx(full.events["reward_threshold"], rel=1e-7)
    assert np.isnan(stopped.reward[-1]) and abs(np.nanmax(stopped.reward) - 0.9) < 1e-9
    assert np.nanmax(stopped.ts) == pytest.approx(stopped.events["reward_threshold"], rel=1e-12)
    assert full.events["converged"] is not None and full.loss[-1] < 1e-3


def test_solve_never_stops_early_silently():
    """A solve that runs out of max_steps raises (recording only J at t0 and t1: a lean program to compile)."""
    with pytest.raises(RuntimeError, match="max_steps"):
        simulate(FlowParams(TASK, max_steps=5, save_ts=[0.0, 1e4], events=(), readouts=False), progress=False)


def test_save_and_load_round_trip(tmp_path):
    trajectory = simulate(FlowParams(TASK, t1=30.0), progress=False)
    trajectory.save(tmp_path / "run")
    loaded = Trajectory.load(tmp_path / "run.npz")
    for name in Trajectory.ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trajectory, name))
    assert loaded.config.to_dict() == trajectory.config.to_dict()
    assert loaded.events == trajectory.events
    assert loaded.t_hit(0.9) == pytest.approx(trajectory.t_hit(0.9), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(t0=5.0, t1=5.0), "t1"),
        (dict(t1=-1.0), "t1"),
        (dict(rtol=-1e-8), "rtol"),
        (dict(atol=0.0), "atol"),
        (dict(save_ts=[0.0, 2e4]), "save_ts"),
        (dict(save_ts=[0.0, 2.0, 1.0]), "save_ts"),
        (dict(solver="euler"), "solver"),
        (dict(coords="polar"), "coords"),
        (dict(max_steps=0), "max_steps"),
        (dict(reward_threshold=1.5), "reward_threshold"),
        (dict(n_vocab=3), "n_vocab"),
        (dict(stop_at="never"), "stop_at"),
        (dict(theta0=gf.Theta(np.nan, 0, 0)), "theta0"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlowParams(TASK, **kwargs)


def test_simulate_many_refuses_mixed_structures():
    """Chains of different n share a batch only where n is data (``flow.bucketable``); other structures are refused."""
    softmax = gf.ModelSpec(attention="softmax")
    with pytest.raises(ValueError, match="structure"):
        simulate_many([FlowParams(TASK, model=softmax), FlowParams(gf.ChainTask.uniform(N + 1), model=softmax)])
    with pytest.raises(ValueError, match="structure"):
        simulate_many([FlowParams(TASK), FlowParams(TASK, model=softmax)])


def test_events_of_a_flow_with_three_saves_equal_the_dense_flows():
    """Each re-solve of an event's bracket saves at least ``flow.ZOOM_SAVES`` times (a config with fewer saves pads its
    main pass), so three saves locate the events as 201 do (with three, the bracket shrank 16-fold only)."""
    assert gf.flow.ZOOM_SAVES > 3
    sparse = simulate(FlowParams(TASK, t1=100.0, save_ts=jnp.array([0.0, 50.0, 100.0])), progress=False)
    dense = simulate(FlowParams(TASK, t1=100.0), progress=False)
    assert sparse.ts.shape == (3,) and sparse.forward_prob.shape == (3, N - 1)
    assert sparse.reward[-1] == pytest.approx(dense.reward[-1], rel=1e-10)  # the same solve, saved elsewhere
    for name, when in dense.events.items():
        assert when is not None, name
        assert sparse.events[name] == pytest.approx(when, rel=1e-6), name


@pytest.mark.slow
def test_events_with_sparse_saves_fall_back_to_a_full_bracket_solve():
    """With saves only at t0 and t1 the in-solve bracket (128 steps) is too short; the event is redone."""
    sparse = simulate(FlowParams(TASK, t1=1e3, save_ts=jnp.array([0.0, 1e3])), progress=False)
    dense = simulate(FlowParams(TASK, t1=1e3), progress=False)
    for name in ("reward_threshold", "converged"):
        assert sparse.events[name] == pytest.approx(dense.events[name], rel=1e-6), name


# ---------------------------------------------------------------------------------------------------
# The pure solve, typed configs, schedules as data, batches that stop apart, I/O, errors, read-outs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", solver_params())
def test_every_solver_runs_the_default_preset(solver):
    """Every entry of SOLVERS solves the default preset and agrees with tsit5 on t_hit(0.9) to 1e-6."""
    preset = lambda name: FlowParams(gf.ChainTask.uniform(8), t1=1e4, solver=name, stop_at="threshold")
    reference, other = hitting_times([preset("tsit5"), preset(solver)])
    assert other == pytest.approx(reference, rel=1e-6)


def _target_config(start_probs, tau, t1=1.5):
    """Train on ``start_probs`` at n = N; record J on the hardest start (a task other than the training one)."""
    return FlowParams(
        gf.ChainTask(N, start_probs),
        gf.ModelSpec(tau=tau),
        t1=t1,
        save_ts=jnp.array([0.0, t1]),
        events=(),
        readouts=False,
        eval_tasks={"target": gf.ChainTask.hardest(N)},
    )


def test_target_reward_derivatives_through_the_whole_solve_match_finite_differences():
    """d J_target(t1) / d start_probs and d / d tau through solve, against central differences of re-solved flows."""
    probs, tau = np.asarray(TASK.start_probs), 0.2
    target = lambda p, s: solve(_target_config(p, s)).eval_reward["target"][-1]
    grad_p, grad_tau = jax.jit(jax.grad(target, argnums=(0, 1)))(jnp.asarray(probs), jnp.asarray(tau))
    solved = lambda p, s: float(simulate(_target_config(p, s)).eval_reward["target"][-1])  # the program of the save test
    h = 1e-5
    for k in (0, N - 2):  # perturb along directions that stay on the simplex: mass from d = 2 to d = k+1
        e = np.zeros(N - 1)
        e[k], e[1] = 1.0, -1.0
        fd = (solved(probs + h * e, tau) - solved(probs - h * e, tau)) / (2 * h)
        assert float(grad_p @ e) == pytest.approx(fd, rel=1e-4), k
    fd_tau = (solved(probs, tau + h) - solved(probs, tau - h)) / (2 * h)
    assert float(grad_tau) == pytest.approx(fd_tau, rel=1e-4)


@pytest.mark.slow
def test_solve_vmaps_and_equals_the_batched_solve():
    configs = [_target_config(np.asarray(gf.ChainTask.mixture(N, c).start_probs), 0.2) for c in (0.2, 0.7)]
    batched = solve_many(configs)
    vmapped = jax.jit(jax.vmap(solve))(stack_configs(configs))
    assert isinstance(batched, Solution) and batched.theta.shape == (2, 2, 5)
    np.testing.assert_allclose(vmapped.eval_reward["target"], batched.eval_reward["target"], rtol=1e-12)


@pytest.mark.slow
def test_configs_that_stop_apart_share_one_batch():
    """Issue 12.4: one config stops at its event, one reaches t1 first, one never reaches it; each alone works."""
    task = gf.ChainTask.uniform(8)
    configs = [FlowParams(task, t1=1e4, stop_at="threshold"), FlowParams(task, t1=1.0, stop_at="threshold")]
    batch = simulate_many(configs)
    alone = [simulate(c, progress=False) for c in configs]
    assert batch[0].events["reward_threshold"] == pytest.approx(alone[0].events["reward_threshold"], rel=1e-9)
    assert batch[1].events["reward_threshold"] is None and alone[1].events["reward_threshold"] is None
    assert np.nanmax(batch[1].ts) == 1.0 and np.nanmax(batch[0].ts) == pytest.approx(1.4648, abs=1e-3)


@pytest.mark.slow
def test_hitting_times_are_the_threshold_events():
    full = simulate(FlowParams(TASK, t1=100.0), progress=False)
    times = hitting_times([FlowParams(TASK, t1=100.0, stop_at="threshold"), FlowParams(TASK, t1=0.1, stop_at="threshold")])
    assert times[0] == pytest.approx(full.events["reward_threshold"], rel=1e-7) and times[1] is None


@pytest.mark.slow
def test_log_time_reaches_far_horizons_in_few_steps():
    """time_scale="log" steps in s = log(1 + t): the same learning time, and t = 1e40 in a few hundred steps."""
    hardest = gf.ChainTask.hardest(8)
    linear = hitting_times([FlowParams(hardest, t1=1e4, stop_at="threshold")])[0]
    logged = hitting_times([FlowParams(hardest, t1=1e4, stop_at="threshold", time_scale="log")])[0]
    assert logged == pytest.approx(linear, rel=1e-6)
    far = simulate(FlowParams(TASK, t1=1e40, time_scale="log"), progress=False)
    assert far.stats["num_steps"] < 2000 and far.ts[-1] == 1e40 and far.reward[-1] > 0.99999


@pytest.mark.slow
def test_eval_tasks_are_recorded_at_every_save():
    hardest = gf.ChainTask.hardest(N)
    trajectory = simulate(FlowParams(TASK, t1=30.0, eval_tasks={"hardest": hardest}), progress=False)
    expected = [gf.expected_reward(gf.Theta.from_array(x), hardest, gf.ModelSpec()) for x in trajectory.theta[::40]]
    np.testing.assert_allclose(trajectory.eval_reward["hardest"][::40], expected, rtol=1e-12)


@pytest.mark.slow
def test_t_hit_of_any_read_out_is_a_root():
    trajectory = simulate(FlowParams(TASK, t1=100.0), progress=False)
    for quantity, level, index in (("traversal_prob", 0.5, None), ("forward_prob", 0.8, 2), ("expected_length", 4.0, None)):
        t = trajectory.t_hit(level, quantity, index)
        at_t = simulate(FlowParams(TASK, t1=t, save_ts=jnp.array([0.0, t])), progress=False)
        value = getattr(at_t, quantity)[-1]
        value = value if index is None else value[index]
        assert abs(value - level) < 1e-7 * max(1.0, level), (quantity, value)


def test_parts_and_flat_keywords_are_one_config():
    flat = FlowParams(TASK, gf.ModelSpec(tau=0.3), (0.2, 0.0, 0.0), t1=50.0, solver="dopri5", save_ts=[0.0, 50.0])
    parts = FlowParams(
        problem=Problem(TASK, gf.ModelSpec(tau=0.3), gf.Theta(0.2, 0.0, 0.0), t1=50.0),
        numerics=Numerics("dopri5"),
        recording=Recording(save_ts=[0.0, 50.0]),
    )
    assert flat.to_dict() == parts.to_dict()
    assert flat.replace(t1=20.0, save_ts=None).t1 == 20.0 and flat.t1 == 50.0
    assert FlowParams.from_dict(json.loads(json.dumps(flat.to_dict()))).to_dict() == flat.to_dict()


def test_a_part_and_its_flat_keywords_together_raise_naming_them():
    problem = Problem(TASK, t1=50.0)
    with pytest.raises(ValueError, match=r"problem= with t1; numerics= with solver"):
        FlowParams(problem=problem, numerics=Numerics(), solver="dopri5", t1=5.0)
    with pytest.raises(ValueError, match=r"recording= with reward_threshold, save_ts"):
        FlowParams(TASK, recording=Recording(), save_ts=[0.0, 1.0], reward_threshold=0.5)
    with pytest.raises(ValueError, match=r"problem= with task"):
        FlowParams(TASK, problem=problem)
    # a part not given is still built from the flat keywords of that part
    mixed = FlowParams(problem=problem, solver="dopri5", save_ts=[0.0, 50.0])
    assert mixed.solver == "dopri5" and mixed.t1 == 50.0 and mixed.save_ts.shape == (2,)


@pytest.mark.slow
def test_module_schedules_are_traced_round_trip_and_batch(empty_compile_cache):
    easy, hard = np.asarray(gf.ChainTask.mixture(N, 0.9).start_probs), np.asarray(gf.ChainTask.hardest(N).start_probs)
    configs = [FlowParams(TASK, t1=20.0, schedule=schedules.Step(s, easy, hard)) for s in (0.5, 2.0)]
    before = compilation_count()
    batch = simulate_many(configs)
    assert compilation_count() == before + 1
    single = simulate(configs[1], progress=False)
    np.testing.assert_allclose(batch[1].theta, single.theta, atol=1e-8)
    restored = FlowParams.from_dict(json.loads(json.dumps(configs[1].to_dict())))
    assert restored.to_dict() == configs[1].to_dict() and isinstance(restored.schedule, schedules.Step)


@pytest.mark.slow
def test_new_callable_schedules_do_not_grow_the_cache_forever(monkeypatch):
    monkeypatch.setattr(compile_cache, "CACHE_SIZE", 1)
    probs = TASK.start_probs
    for _ in range(2):
        simulate(
            FlowParams(TASK, t1=1.0, save_ts=[0.0, 1.0], events=(), readouts=False, schedule=lambda t: probs), progress=False
        )
    assert len(compile_cache._COMPILED) == 1


@pytest.mark.slow
def test_executables_are_dropped_before_memory_maps_run_out(monkeypatch):
    """A process past vm.max_map_count aborts in its next compilation: the cache gives maps back first."""
    if compile_cache.memory_maps() is None:
        pytest.skip("no /proc/self/maps here")
    for size in (3, 4, 5):
        compile_cache.compiled("maps_probe", lambda x: jnp.cumsum(jnp.sin(x) * 2.0), (jnp.ones(size),))
    held = len(compile_cache._COMPILED)
    before = compile_cache.memory_maps()[0]
    monkeypatch.setattr(compile_cache, "MAP_SHARE", 1.0)
    assert compile_cache.release_memory_maps() == 0 and len(compile_cache._COMPILED) == held  # under the budget
    monkeypatch.setattr(compile_cache, "MAP_SHARE", 0.0)
    assert compile_cache.release_memory_maps() == held and not compile_cache._COMPILED
    assert compile_cache.memory_maps()[0] < before
    compile_cache.compiled("maps_probe", lambda x: jnp.cumsum(jnp.sin(x) * 2.0), (jnp.ones(6),))
    assert len(compile_cache._COMPILED) == 1  # compiling releases first, then keeps the new executable


def test_programs_compile_with_the_cpu_options_and_give_xla_defaults_numbers():
    """compile_lowered's XLA:CPU options, batch and quick tier, with and without XLA's while-loop passes, are accepted
    by this XLA (a renamed option or pass raises) and change speed only."""
    theta = jnp.array([0.7, -0.2, 0.1, 0.0, 0.0])
    fn = jax.grad(lambda y: gf.expected_reward(gf.Theta.from_array(y), gf.ChainTask.mixture(9, 0.3), gf.ModelSpec("softmax")))
    lowered = jax.jit(fn).lower(theta)
    default = lowered.compile()(theta)
    for quick, loop_passes in ((False, True), (True, True), (True, False)):
        ours = compile_cache.compile_lowered(lowered, quick, loop_passes)(theta)
        assert jnp.all(jnp.isfinite(ours)) and jnp.any(ours != 0)
        np.testing.assert_allclose(ours, default, rtol=1e-13, atol=1e-300)


def test_programs_compiled_together_are_kept_and_run_as_each_is_ready(empty_compile_cache):
    """compile_cache.compiled_together compiles the missing requests once (a repeat finds them); run_together hands each
    request's executable to ``use`` on a thread per core and returns the uses' results in the requests' order."""
    x = jnp.arange(4.0)
    requests = [("together_probe", lambda y, k=k: jnp.cumsum(y) * k, (x,), k) for k in (1.0, 2.0, 3.0)]
    before = compile_cache.compilation_count()
    assert compile_cache.compiled_together(requests[:2]) == 2 and compile_cache.compiled_together(requests[:2]) == 0
    out = compile_cache.run_together(requests, lambda i, executable: (i, np.asarray(executable(x))))
    assert compile_cache.compilation_count() - before == 3  # only the third was compiled again
    assert [i for i, _ in out] == [0, 1, 2]
    for (_, value), k in zip(out, (1.0, 2.0, 3.0)):
        np.testing.assert_array_equal(value, np.cumsum(np.arange(4.0)) * k)
    executable, seconds = compile_cache.compiled(*requests[2])
    assert seconds == 0.0 and compile_cache.compilation_count() - before == 3


def test_programs_compiled_in_turn_are_kept_and_a_single_solve_is_two_equal_to_the_batch_program(empty_compile_cache):
    """compile_cache.compiled_in_turn returns the requests' executables in order (each traced while the ones before it
    compile, whichever has a thread of its own) and keeps them: a repeat compiles nothing, and a cached request is not
    compiled again.  One config's solve is three programs (the rewards and events after a pass, a pass of the solve,
    the read-outs: ``flow._compiled_solve``); a batch holds all in one, with the same numbers."""
    x = jnp.arange(4.0)
    requests = [compile_cache.CompileRequest("in_turn_probe", lambda y, k=k: jnp.cumsum(y) * k, (x,), k) for k in (1.0, 2.0)]
    before = compile_cache.compilation_count()
    executables, seconds = compile_cache.compiled_in_turn(requests, longest=1)
    assert compile_cache.compilation_count() - before == 2 and seconds > 0.0
    for executable, k in zip(executables, (1.0, 2.0)):
        np.testing.assert_array_equal(np.asarray(executable(x)), np.cumsum(np.arange(4.0)) * k)
    again, seconds = compile_cache.compiled_in_turn(requests)
    assert [a is b for a, b in zip(again, executables)] == [True, True] and seconds == 0.0
    assert compile_cache.compilation_count() - before == 2
    config = gf.FlowParams(gf.ChainTask.mixture(6, 0.2), t1=50.0, eval_tasks={"hardest": gf.ChainTask.hardest(6)})
    single = simulate(config)
    assert {key[0] for key in compile_cache._COMPILED} >= {"pass", "after_pass", "readouts"}
    whole = jax.device_get(jax.jit(gf.flow._solve)(gf.flow.bucketed(config)))  # one program holding both
    for name in ("reward", "expected_length", "traversal_prob"):
        np.testing.assert_allclose(getattr(single, name), getattr(whole, name), rtol=1e-13, err_msg=name)
    np.testing.assert_allclose(single.forward_prob, whole.forward_prob[:, :5], rtol=1e-13)
    np.testing.assert_allclose(single.eval_reward["hardest"], whole.eval_reward["hardest"], rtol=1e-13)


@pytest.mark.parametrize("save_ts", [None, (0.0, 10.0, 1e4)], ids=["default_saves", "three_saves"])
def test_one_configs_passes_on_the_host_equal_the_traced_loop(save_ts):
    """One config's solve runs the loop over its passes (the main solve, then each event's bracket re-solved) on the
    host, each pass a run of two compiled programs; its Solution equals the one program holding the loop, compiled
    at the same XLA level (the expected length within an ulp: its own solve, fused apart).  The example outputs
    the host programs are compiled for (``flow._pass_shapes``) are the pass's own."""
    config = gf.FlowParams(gf.ChainTask.mixture(6, 0.2), save_ts=save_ts)
    program = gf.flow.alone(config)
    traced = jax.eval_shape(lambda p: gf.flow._one_pass(p, gf.flow._plan(p), jnp.asarray(0), None, False), program)
    expected = gf.flow._pass_shapes(program, gf.flow._slots(program))
    assert {name: (s.shape, s.dtype) for name, s in traced.items()} == expected
    whole = gf.flow._trimmed(compile_cache.compile_lowered(jax.jit(gf.flow._solve).lower(program), quick=True)(program), 6)
    single = gf.flow.solve(config)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(single), jax.tree.leaves(whole)):
        if jax.tree_util.keystr(path) == ".expected_length":
            np.testing.assert_allclose(got, want, rtol=4e-16)
        else:
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


def test_an_exported_program_is_traced_once_and_compiled_from_disk_after(tmp_path):
    """compile_cache.exported_program keeps its contract: (executable, traced), traced the first time only."""
    x = jnp.arange(3.0)
    fn = lambda y: {"double": 2.0 * y}
    first, traced = compile_cache.exported_program(tmp_path, "export_probe", fn, (x,))
    again, traced_again = compile_cache.exported_program(tmp_path, "export_probe", fn, (x,), quick=True)
    assert traced and not traced_again
    for executable in (first, again):
        np.testing.assert_array_equal(np.asarray(executable(x)["double"]), 2.0 * np.arange(3.0))


def test_one_config_compiles_quick_and_a_batch_does_not_with_the_same_numbers():
    """simulate's program is a quick one (XLA level 0), simulate_many's is not, and both give the same trajectory."""
    config = gf.FlowParams(gf.ChainTask.mixture(6, 0.2), t1=50.0)
    single, batch = simulate(config), gf.simulate_many([config, config])[0]
    tiers = {key[0]: key[3] for key in compile_cache._COMPILED}  # (kind, structure, static key, quick, loop_passes)
    assert tiers["pass"] is True and tiers["after_pass"] is True and tiers["solve_many"] is False
    np.testing.assert_allclose(single.reward, batch.reward, rtol=1e-12)
    np.testing.assert_allclose(single.theta, batch.theta, rtol=1e-10, atol=1e-13)


def test_save_is_atomic_and_load_checks_the_arrays(tmp_path):
    trajectory = simulate(_target_config(np.asarray(TASK.start_probs), 0.2, t1=30.0))  # the program of the derivative test
    trajectory.save(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.npz"], "no temporary files left behind"
    loaded = Trajectory.load(tmp_path / "run")
    np.testing.assert_array_equal(loaded.eval_reward["target"], trajectory.eval_reward["target"])
    with np.load(tmp_path / "run.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["reward"] = arrays["reward"][:-1]
    np.savez(tmp_path / "run.npz", **arrays)
    with pytest.raises(ValueError, match="reward"):
        Trajectory.load(tmp_path / "run")
    (tmp_path / "run.npz").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(ValueError, match="run.npz"):
        Trajectory.load(tmp_path / "run")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(t1=np.inf), "t1"),
        (dict(t0=-np.inf), "t0"),
        (dict(save_ts=[0.0, np.nan, 2.0]), "save_ts"),
        (dict(convergence_loss=1.5), "convergence_loss"),
        (dict(convergence_loss=0.0), "convergence_loss"),
        (dict(theta0=(0.3, 0.0, 0.0, 0.0, 0.0, 0.0)), "theta0"),
        (dict(theta0="alpha"), "theta0"),
        (dict(t1="soon"), "t1"),
        (dict(events=("never",)), "events"),
        (dict(eval_tasks={"x": gf.ChainTask.uniform(N + 1)}), "eval_tasks"),
        (dict(time_scale="sqrt"), "time_scale"),
    ],
)
def test_more_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlowParams(TASK, **kwargs)


def test_theta0_as_numbers_is_accepted():
    assert FlowParams(TASK, theta0=(0.3, 0.0, 0.0)).to_dict() == FlowParams(TASK, theta0=[0.3, 0, 0, 0, 0]).to_dict()


def test_from_dict_names_a_missing_or_unknown_key():
    good = FlowParams(TASK).to_dict()
    with pytest.raises(ValueError, match="task"):
        FlowParams.from_dict({k: v for k, v in good.items() if k != "task"})
    with pytest.raises(ValueError, match="colour"):
        FlowParams.from_dict({**good, "colour": "red"})
    with pytest.raises(ValueError, match="start_probs"):
        FlowParams.from_dict({**good, "task": {"n": N}})
    with pytest.raises(ValueError, match="model"):
        FlowParams.from_dict({**good, "model": {"attention": "linear", "temperature": 1.0}})


@pytest.mark.slow
def test_a_nan_vector_field_is_reported_as_such():
    nan_probs = lambda t: jnp.full(N - 1, jnp.nan)
    with pytest.raises(RuntimeError, match="not finite") as error:
        simulate(
            FlowParams(TASK, t1=1.0, save_ts=[0.0, 1.0], events=(), readouts=False, schedule=nan_probs, max_steps=2000),
            progress=False,
        )
    assert "max_steps" not in str(error.value)
    assert f"config with schedule <lambda> (n = {N}" in str(error.value)  # named (a callable schedule has no hash)


def test_float32_is_refused():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(RuntimeError, match="float64"):
            simulate(FlowParams(TASK, t1=2.0), progress=False)
    finally:
        jax.config.update("jax_enable_x64", True)


_CACHE_PROBE = textwrap.dedent(
    """
    import sys
    import time
    from jax._src import monitoring
    hits = []
    monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    import gradflow as gf
    import gradflow.cli
    from gradflow.flow import FlowParams, simulate
    from gradflow.compile_cache import programs_traced
    imported = any(name in sys.modules for name in ("diffrax", "optax", "optimistix", "matplotlib"))
    start = time.perf_counter()
    trajectory = simulate(FlowParams(gf.ChainTask.uniform(3), t1=5.0, save_ts=[0.0, 5.0], events=(), readouts=False))
    print(len(hits), time.perf_counter() - start, programs_traced(), repr(float(trajectory.reward[-1])))
    import jax
    solver_imported = "diffrax" in sys.modules or "optimistix" in sys.modules
    print(jax.config.jax_persistent_cache_min_compile_time_secs, imported, solver_imported)
    """
)


def test_persistent_cache_serves_a_second_process(tmp_path):
    env = {**os.environ, "GRADFLOW_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("GRADFLOW_NO_CACHE", None)
    run = lambda: subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True, timeout=600)
    cold, warm = run(), run()
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr[-2000:] + warm.stderr[-2000:]
    cold_hits, _, cold_traced, cold_reward, kept_from, cold_import, cold_solve = cold.stdout.split()
    warm_hits, _, warm_traced, warm_reward, _, warm_import, warm_solve = warm.stdout.split()
    assert int(cold_hits) == 0 and int(warm_hits) >= 1, (cold.stdout, warm.stdout)
    # programs that compile for 0.1 s or more are kept (JAX's default of 1 s left out one config's rewards and
    # read-out programs, compiled again by every new process)
    assert float(kept_from) == compile_cache.MIN_COMPILE_SECONDS < compile_cache.JAX_MIN_COMPILE_SECONDS
    assert any((tmp_path / "cache").iterdir())
    # the traced programs themselves were kept (jax.export): the solve's pass, the rewards after it and the read-outs;
    # the warm process traces nothing and gets the same numbers
    assert int(cold_traced) == 3 and int(warm_traced) == 0, (cold.stdout, warm.stdout)
    assert warm_reward == cold_reward
    # diffrax and optimistix are imported by the first solve built (gradflow._imports): not by the CLI's imports (nor
    # optax, which only training and design use, nor matplotlib, which a figure drawn imports), not by a warm solve
    assert (cold_import, cold_solve, warm_import, warm_solve) == ("False", "True", "False", "False")
    for kind in ("pass", "after_pass", "readouts"):
        assert list((tmp_path / "cache" / "exported").glob(f"{kind}-*.bin"))


def test_theta0_takes_its_first_numbers_the_rest_zero():
    """theta0 may give 1 to Theta.size() numbers in Theta.fields() order; the rest are 0."""
    params = FlowParams(gf.ChainTask.uniform(4), theta0=(0.3, -0.1))
    np.testing.assert_array_equal(params.theta0.as_array(), [0.3, -0.1, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="theta0 must hold 1 to 5 numbers"):
        FlowParams(gf.ChainTask.uniform(4), theta0=np.zeros((2, 2)))


def test_t_hit_at_an_event_level_reads_the_solve_and_compiles_nothing():
    """t_hit(reward_threshold) is the event the solve located (the same bracket and bisection): no second program."""
    trajectory = simulate(FlowParams(TASK, t1=100.0), progress=False)
    before = compile_cache.compilation_count()
    t = trajectory.t_hit(float(trajectory.config.reward_threshold))
    assert t == trajectory.events["reward_threshold"] and compile_cache.compilation_count() == before
    nudged = trajectory.t_hit(float(np.nextafter(0.9, 1.0)))  # a level off the event: root-found afresh
    assert nudged == pytest.approx(t, rel=1e-7) and nudged >= t


@pytest.mark.parametrize(
    "model",
    [
        gf.ModelSpec(),
        pytest.param(gf.ModelSpec(mask_self=False, max_len=9), marks=pytest.mark.slow),
        pytest.param(gf.ModelSpec(attention="softmax", tau=0.1), marks=pytest.mark.slow),
    ],
    ids=["linear", "capped-self-loops", "softmax"],
)
def test_events_located_in_the_solve_agree_with_a_dense_bisection(model):
    """The solve's events (its bracket re-solved EVENT_ZOOMS times as passes of the one solve) against
    t_hit's independent route (a dense re-solve of the save bracket, bisected): one time to the solver's tolerance."""
    trajectory = simulate(FlowParams(gf.ChainTask.uniform(6), model=model, t1=1e4, reward_threshold=0.6, convergence_loss=0.2))
    for name, level in (("reward_threshold", 0.6), ("converged", 0.8)):
        located = trajectory.events[name]
        assert located is not None, name
        bisected = trajectory.t_hit(float(np.nextafter(level, 1.0)))  # off the event level: root-found afresh
        assert bisected == pytest.approx(located, rel=1e-8), name
        assert trajectory.reward[np.searchsorted(trajectory.ts, located) - 1] < level  # the save before is below it
