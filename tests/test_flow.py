"""The gradient-flow simulator: accuracy, predicted shape, coordinates, schedules, batching, I/O."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow as gf
from gradflow.flow import FlowParams, Trajectory, compilation_count, simulate, simulate_many

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


def test_trajectory_matches_fixed_step_rk4():
    save_ts = jnp.array([0.0, 0.5, 1.0, 2.0, 5.0, 10.0])
    params = FlowParams(TASK, t1=10.0, save_ts=save_ts)
    trajectory = simulate(params, progress=False)
    grad = jax.jit(lambda t, y: jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), TASK, gf.ModelSpec()))(y))
    dt = 2e-3
    reference = _rk4(grad, params.theta0.as_array(), 10.0, dt)[np.round(np.asarray(save_ts) / dt).astype(int)]
    error = np.max(np.abs(trajectory.theta - reference))
    assert error < 1e-6, f"max |theta - RK4| = {error:.2e}"


def test_default_preset_learns_forward_traversal():
    trajectory = simulate(FlowParams(gf.ChainTask.uniform(8), t1=100.0), progress=False)
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


def test_simulate_many_compiles_once_and_matches_single_runs():
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
    simulate(FlowParams(gf.ChainTask.hardest(N), gf.ModelSpec(tau=0.3), gf.Theta(0.1, 0.2, -0.1), t1=7.0, rtol=1e-7), progress=False)
    assert compilation_count() == before


def test_t_hit_is_a_root_of_the_reward():
    params = FlowParams(TASK, t1=100.0)
    trajectory = simulate(params, progress=False)
    for level in (0.7, 0.95):
        t = trajectory.t_hit(level)
        at_t = simulate(FlowParams(TASK, t1=t, save_ts=jnp.array([0.0, t])), progress=False).reward[-1]
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
    with pytest.raises(RuntimeError, match="max_steps"):
        simulate(FlowParams(TASK, max_steps=5), progress=False)


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
    with pytest.raises(ValueError, match="structure"):
        simulate_many([FlowParams(TASK), FlowParams(gf.ChainTask.uniform(N + 1))])


def test_events_with_sparse_saves_fall_back_to_a_full_bracket_solve():
    """With saves only at t0 and t1 the in-solve bracket (128 steps) is too short; the event is redone."""
    sparse = simulate(FlowParams(TASK, t1=1e3, save_ts=jnp.array([0.0, 1e3])), progress=False)
    dense = simulate(FlowParams(TASK, t1=1e3), progress=False)
    for name in ("reward_threshold", "converged"):
        assert sparse.events[name] == pytest.approx(dense.events[name], rel=1e-6), name
