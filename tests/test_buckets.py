"""n as data: chains laid out in power-of-two buckets (``PaddedTask``) give today's per-n results to round-off.

The independent route is the per-n program (a ``ChainTask``, n static), compiled for each n; the bucketed
one is compiled once per bucket.  Bucket edges (n = 2..5, 8/9, 16/17, 32/33, 64/65) are where padding
changes and where the rows' kinds (first, second, interior, last) overlap.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_capped

import gradflow as gf
from gradflow import capped, flow, objective, readouts
from gradflow.model import LaidOutModel, step_probabilities
from gradflow.task import PaddedTask, bucket_size

EDGES = [2, 9]
WIDE = [3, 4, 5, 8, 16, 17, 31, 32, 33, 64, 65, 70]
QUANTITIES = {
    "reward": objective.expected_reward,
    "loss": objective.expected_loss,
    "success": objective.same_side_probability,
    "length": objective.length_per_start,
    "traversal": objective.traversal_per_start,
    "forward": lambda theta, task, model: step_probabilities(theta, task, model).forward_given_move,
    "switch": lambda theta, task, model: step_probabilities(theta, task, model).switch,
}


def _thetas(seed: int):
    rng = np.random.default_rng(seed)
    return [gf.Theta(*rng.normal(0.0, 2.0, 3)), gf.Theta(0.3, 0.0, 0.0), gf.Theta(3.0, -1.0, 0.5)]


def _check_n(n: int, model: gf.ModelSpec) -> None:
    """Every closed form on the padded task, with the model as it is and laid out (mask and isolated count traced),
    against the per-n one with the static model."""
    task = gf.ChainTask.mixture(n, 0.3, (1,)) if n > 2 else gf.ChainTask.uniform(n)
    padded = PaddedTask.padded(task, bucket_size(n))
    laid_out = LaidOutModel.of(model)
    for theta in _thetas(n):
        for name, fn in QUANTITIES.items():
            want = np.asarray(fn(theta, task, model))
            for form in (model, laid_out):
                got = np.asarray(fn(theta, padded, form))
                got = got[: n - 1] if got.ndim else got
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300, err_msg=f"{name}, n={n}, {theta}, {form}")
        grad = lambda t, m: jax.grad(lambda x: objective.expected_reward(gf.Theta.from_array(x), t, m))(theta.as_array())
        for form in (model, laid_out):
            np.testing.assert_allclose(grad(padded, form), grad(task, model), rtol=1e-10, atol=1e-14, err_msg=f"gradient, n={n}")


@pytest.mark.parametrize("n", [EDGES[0], *(slow_case(n) for n in EDGES[1:])])
def test_bucketed_closed_forms_equal_the_per_n_ones(n):
    _check_n(n, gf.ModelSpec())


@pytest.mark.slow
@pytest.mark.parametrize("n", WIDE)
@pytest.mark.parametrize("model", [gf.ModelSpec(), gf.ModelSpec(mask_self=False, n_isolated=2, tau=0.5)], ids=["plain", "loops"])
def test_bucketed_closed_forms_equal_the_per_n_ones_wide(n, model):
    _check_n(n, model)


def test_bucketed_closed_forms_with_self_loops_and_isolated_vertices():
    _check_n(6, gf.ModelSpec(mask_self=False, n_isolated=3, tau=0.3))


@pytest.mark.parametrize("mask_self, n_isolated", [(False, 2), slow_case(True, 0)])
def test_the_laid_out_model_in_extended_numbers_equals_the_static_one(mask_self, n_isolated):
    """The laid-out model (mask and isolated count traced) in extended numbers, on the padded task: reward, loss,
    lengths and the reward's gradient equal the static model's per-n extended solve."""
    model = gf.ModelSpec(mask_self=mask_self, n_isolated=n_isolated, numbers="extended", tau=0.3)
    task, theta = gf.ChainTask.mixture(6, 0.3, (1,)), gf.Theta(2.0, -1.0, 0.5)
    padded, laid_out = PaddedTask.padded(task, 8), LaidOutModel.of(model)
    for name in ("reward", "loss", "length"):
        want = np.asarray(QUANTITIES[name](theta, task, model))
        got = np.asarray(QUANTITIES[name](theta, padded, laid_out))
        np.testing.assert_allclose(got[: task.n - 1] if got.ndim else got, want, rtol=1e-13, err_msg=name)
    grad = lambda t, m: jax.grad(lambda x: objective.expected_reward(gf.Theta.from_array(x), t, m))(theta.as_array())
    np.testing.assert_allclose(grad(padded, laid_out), grad(task, model), rtol=1e-12, atol=1e-15)


def test_buckets_are_powers_of_two_from_four():
    assert [bucket_size(n) for n in (2, 3, 4, 5, 8, 9, 16, 17, 70)] == [4, 4, 4, 8, 8, 16, 16, 32, 128]


def test_a_new_n_in_a_compiled_bucket_compiles_nothing():
    """A new n in a compiled bucket, and "auto" spelled as the solver it stands for (tsit5 here), compile nothing."""
    gf.simulate(gf.FlowParams(gf.ChainTask.uniform(6), t1=50.0))
    before = gf.compile_cache.compilation_count()
    trajectory = gf.simulate(gf.FlowParams(gf.ChainTask.uniform(7), t1=50.0))
    explicit = gf.simulate(gf.FlowParams(gf.ChainTask.uniform(7), t1=50.0, solver="tsit5"))
    assert gf.compile_cache.compilation_count() == before
    assert trajectory.forward_prob.shape == (201, 6) and trajectory.events["reward_threshold"] is not None
    assert (trajectory.config.solver, explicit.config.solver) == ("auto", "tsit5")  # each keeps its own spelling
    np.testing.assert_array_equal(explicit.theta, trajectory.theta)


def test_auto_and_the_solver_it_stands_for_share_a_program_where_n_is_not_data():
    """A config that is not laid out (softmax: n static) is solved in its resolved form too: "auto" and tsit5 share
    one program."""
    model = gf.ModelSpec(attention="softmax")
    auto = gf.simulate(gf.FlowParams(gf.ChainTask.uniform(4), model, t1=20.0, events=()))
    before = gf.compile_cache.compilation_count()
    explicit = gf.simulate(gf.FlowParams(gf.ChainTask.uniform(4), model, t1=20.0, events=(), solver="tsit5"))
    assert gf.compile_cache.compilation_count() == before
    np.testing.assert_array_equal(explicit.theta, auto.theta)


@pytest.mark.parametrize("n", [3, pytest.param(5, marks=pytest.mark.slow), pytest.param(9, marks=pytest.mark.slow)])
def test_a_bucketed_flow_equals_the_per_n_flow(n):
    """simulate (bucketed) against the per-n program of the same config: saves, read-outs and events."""
    params = gf.FlowParams(gf.ChainTask.uniform(n), t1=200.0)
    assert flow.bucketable(params)
    bucketed = gf.simulate(params)
    direct = jax.device_get(jax.jit(flow._solve)(params))  # n static: the per-n program
    np.testing.assert_allclose(bucketed.theta, direct.theta, rtol=1e-9, atol=1e-12)
    for name in ("reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob"):
        np.testing.assert_allclose(getattr(bucketed, name), getattr(direct, name), rtol=1e-9, atol=1e-12, err_msg=name)
    for event, name in (("threshold", "reward_threshold"), ("converged", "converged")):
        assert bucketed.events[name] == pytest.approx(float(direct.event_times[event]), rel=1e-9)


MASKS_AND_ISOLATED = [(True, 0), (False, 0), (True, 2), (False, 5)]


@pytest.mark.parametrize("checked", [(3,), slow_case((0, 1, 2, 3))])
def test_every_mask_and_isolated_count_of_a_bucket_is_one_program_and_equals_its_own(checked, empty_compile_cache):
    """The self-mask and the number of isolated vertices are data (``LaidOutModel``): flows of either mask and any
    isolated count in one bucket compile once, alone or batched together (with the default flow too), and the
    ``checked`` ones equal the program compiled for their own static model (saves, read-outs and events; the default
    run checks the one with self-loops and five isolated vertices).  The default flow (masked, no isolated vertex)
    alone keeps its own program, which holds code for neither."""
    configs = [
        gf.FlowParams(gf.ChainTask.uniform(n), gf.ModelSpec(mask_self=mask, n_isolated=m, tau=0.3), t1=100.0)
        for n, (mask, m) in zip((5, 6, 7, 8), MASKS_AND_ISOLATED)
    ]
    assert [flow.options_as_data([cfg]) for cfg in configs] == [False, True, True, True]
    assert isinstance(flow.bucketed(configs[0]).model, gf.ModelSpec)
    assert isinstance(flow.bucketed(configs[1]).model, LaidOutModel)
    before = gf.compile_cache.compilation_count()
    alone = [gf.simulate(cfg) for cfg in configs]
    # the default's three programs (``flow._compiled_solve``), and the options' three
    assert gf.compile_cache.compilation_count() == before + 6
    batch = gf.simulate_many(configs)
    assert gf.compile_cache.compilation_count() == before + 7
    lengths = [trajectory.expected_length[-1] for trajectory in alone]
    assert len(set(np.round(lengths, 6))) == len(configs)  # the options change what is solved
    for cfg, one, batched in (triple for k, triple in enumerate(zip(configs, alone, batch)) if k in checked):
        direct = jax.device_get(jax.jit(flow._solve)(cfg))  # n, mask and count static: the config's own program
        for got in (one, batched):
            np.testing.assert_allclose(got.theta, direct.theta, rtol=1e-9, atol=1e-12)
            for name in ("reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob"):
                np.testing.assert_allclose(getattr(got, name), getattr(direct, name), rtol=1e-9, atol=1e-12, err_msg=name)
            assert got.events["reward_threshold"] == pytest.approx(float(direct.event_times["threshold"]), rel=1e-9)


def test_a_batch_runs_in_whole_chunks_and_each_member_equals_its_own_solve(monkeypatch, empty_compile_cache):
    """On CPU a batch larger than ``BATCH_CHUNK`` runs as a loop over chunks of vmapped members, padded to whole chunks
    (copies of its last member, dropped after): one compilation, every member equal to its own solve."""
    monkeypatch.setattr(flow, "BATCH_CHUNK", 4)  # 6 members: two chunks, the second padded
    assert flow.chunked_on()
    configs = [
        gf.FlowParams(gf.ChainTask.mixture(4, c), t1=20.0, save_ts=[0.0, 5.0, 20.0], events=())
        for c in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ]
    before = gf.compile_cache.compilation_count()
    batch = gf.simulate_many(configs)
    assert gf.compile_cache.compilation_count() == before + 1 and len(batch) == len(configs)
    for cfg, trajectory in zip(configs, batch):
        assert trajectory.config is cfg
    for index in (0, 5):  # the first chunk's first member and the padded chunk's last real one
        alone = gf.simulate(configs[index])
        np.testing.assert_allclose(batch[index].theta, alone.theta, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(batch[index].forward_prob, alone.forward_prob, rtol=1e-10, atol=1e-13)


def test_a_batch_on_several_threads_is_one_program_and_equals_the_one_thread_batch(monkeypatch, empty_compile_cache):
    """On the default CPU device ``simulate_many`` splits a batch of several chunks into one slice per core, the last
    padded with copies of its last config, and runs one compiled program of the slice's size on every slice at once:
    one compilation, and every member (chains of different n, so every slice shares the longest chain's bucket) equal
    to the same batch on one thread."""
    monkeypatch.setattr(flow, "BATCH_CHUNK", 4)
    configs = [
        gf.FlowParams(gf.ChainTask.mixture(n, c), t1=20.0, events=())
        for n, c in zip((3, 5, 4, 6, 5, 3, 4), (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 0.4))
    ]
    monkeypatch.setattr(flow, "host_threads", lambda size: 3)  # slices of 3, 3 and 1 (+2 copies)
    before = gf.compile_cache.compilation_count()
    threaded = gf.simulate_many(configs)
    assert gf.compile_cache.compilation_count() == before + 1
    assert {t.stats["threads"] for t in threaded} == {3}
    monkeypatch.setattr(flow, "host_threads", lambda size: 1)
    alone = gf.simulate_many(configs)
    for cfg, a, b in zip(configs, threaded, alone):
        assert a.config is cfg and a.forward_prob.shape[-1] == cfg.task.n - 1
        np.testing.assert_array_equal(a.theta, b.theta)
        np.testing.assert_array_equal(a.forward_prob, b.forward_prob)


def test_the_host_runs_a_batch_on_a_thread_per_core_up_to_one_per_chunk():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert flow.host_threads(1) == 1 and flow.host_threads(flow.BATCH_CHUNK - 1) == 1
    assert flow.host_threads(2 * flow.BATCH_CHUNK) == min(cores, 2)
    assert flow.host_threads(1000 * flow.BATCH_CHUNK) == cores


def test_configs_of_different_n_share_one_batch(empty_compile_cache):
    configs = [gf.FlowParams(gf.ChainTask.uniform(n), t1=50.0) for n in (2, 5, 7)]
    before = gf.compile_cache.compilation_count()
    batch = gf.simulate_many(configs)
    assert gf.compile_cache.compilation_count() - before <= 1
    for cfg, trajectory in zip(configs, batch):
        alone = gf.simulate(cfg)
        assert trajectory.forward_prob.shape == (201, cfg.task.n - 1)
        np.testing.assert_allclose(trajectory.reward, alone.reward, rtol=1e-9)
    assert not flow.bucketable(gf.FlowParams(gf.ChainTask.uniform(5), model=gf.ModelSpec(attention="softmax")))
    assert jnp.shape(flow.bucketed(configs[0]).task.start_probs) == (3,)


# --------------------------------------------------------------------------------------------------
# The cap as data
# --------------------------------------------------------------------------------------------------

CAPPED = [  # (n, cap, mask_self, n_isolated): bucket edges of n (2, 5, 8/9) and of the cap (1, 4/5, 8/9, 16)
    (2, 1, True, 0),
    (5, 6, False, 2),
    slow_case(9, 4, True, 1),
    slow_case(8, 9, False, 0),
    slow_case(3, 16, True, 3),
]


def _laid_out_capped(n: int, cap: int, mask: bool, m: int, cap_size: int | None = None):
    """(task, padded task, static model, laid-out model): n in its bucket, the cap in ``cap_size`` (default its own
    bucket) with the mask and isolated count."""
    model = gf.ModelSpec(mask_self=mask, n_isolated=m, max_len=cap, tau=0.3)
    task = gf.ChainTask.mixture(n, 0.3, (1,)) if n > 2 else gf.ChainTask.uniform(n)
    padded = PaddedTask.padded(task, bucket_size(n))
    return task, padded, model, LaidOutModel.of(model, bucket_size(cap) if cap_size is None else cap_size)


@pytest.mark.parametrize("n, cap, mask, m", CAPPED)
def test_capped_closed_forms_in_a_bucket_equal_the_per_n_ones(n, cap, mask, m):
    """n and the cap as data: the capped read-outs per start on the padded task with the laid-out model (the cap
    traced, its recursions running the cap's bucket, the steps past it keeping their values) equal the static
    per-(n, cap) program's, the bucket's slots past n - 1 hold zeros, and J and its gradient agree."""
    task, padded, model, laid_out = _laid_out_capped(n, cap, mask, m)
    for theta in _thetas(n + cap):
        want, got = capped.per_start(theta, task, model), capped.per_start(theta, padded, laid_out)
        for name in want._fields:
            full = np.asarray(getattr(got, name))
            assert full.shape == (bucket_size(n) - 1,) and np.all(full[n - 1 :] == 0.0), name
            np.testing.assert_allclose(full[: n - 1], getattr(want, name), rtol=1e-12, atol=1e-300, err_msg=name)
        reward = lambda x, t, md: capped.expected_reward(gf.Theta.from_array(x), t, md)
        value, grad = jax.value_and_grad(reward)(theta.as_array(), padded, laid_out)
        np.testing.assert_allclose(value, reward(theta.as_array(), task, model), rtol=1e-12)
        np.testing.assert_allclose(grad, jax.grad(reward)(theta.as_array(), task, model), rtol=1e-10, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("n", WIDE)
@pytest.mark.parametrize("cap, mask, m", [("n + 1", False, 2), ("2n", True, 0)])
def test_capped_closed_forms_in_a_bucket_equal_the_per_n_ones_wide(n, cap, mask, m):
    test_capped_closed_forms_in_a_bucket_equal_the_per_n_ones(n, n + 1 if cap == "n + 1" else 2 * n, mask, m)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(5, 8),
    cap=st.integers(1, 16),
    mask=st.booleans(),
    m=st.integers(0, 3),
    x=st.tuples(*[st.floats(-40.0, 40.0)] * 3),
)
def test_one_capped_program_serves_every_n_cap_and_option_of_a_bucket(n, cap, mask, m, x):
    """Property: one compiled program (n in the bucket of 8, caps up to 16, mask and isolated count traced) gives the
    dense matrix powers of the token-built chain (tests/reference.py) for every n, cap, option and theta up to
    |theta| / tau = 200, with a finite gradient."""
    task, padded, model, laid_out = _laid_out_capped(n, cap, mask, m, cap_size=16)
    theta = gf.Theta(*x)
    got = np.stack([np.asarray(v)[: n - 1] for v in capped.per_start(theta, padded, laid_out)[:4]])
    np.testing.assert_allclose(got, dense_capped(theta, n, model, cap), rtol=0, atol=1e-10)
    grad = jax.grad(lambda v: capped.expected_reward(gf.Theta.from_array(v), padded, laid_out))(theta.as_array())
    assert np.all(np.isfinite(grad))


CAPPED_FLOWS = [(3, 4, 0), (6, 5, 2), (7, 14, 1)]  # (n, cap, n_isolated): two buckets of the cap in one batch


@pytest.mark.parametrize("checked", [(1,), slow_case((0, 1, 2))])
def test_capped_flows_of_different_n_and_caps_share_one_batch(checked, empty_compile_cache):
    """Capped flows of different n, caps and isolated counts share one batch and one compilation (a capped flow alone
    keeps its own program, n and cap static), and the ``checked`` members equal their own solves: saves, read-outs and
    events."""
    configs = [
        gf.FlowParams(gf.ChainTask.uniform(n), gf.ModelSpec(n_isolated=m, max_len=cap, tau=0.3), t1=60.0)
        for n, cap, m in CAPPED_FLOWS
    ]
    assert flow.shared_layout(configs) == flow.Layout(8, True, 16)
    assert flow.shared_layout(configs[:1] * 2) is None  # one n, cap and option: nothing to share
    assert isinstance(flow.alone(configs[0]).model, gf.ModelSpec)
    before = gf.compile_cache.compilation_count()
    batch = gf.simulate_many(configs)
    assert gf.compile_cache.compilation_count() == before + 1
    assert len({float(t.reward[-1]) for t in batch}) == len(configs)
    for cfg, trajectory in (pair for k, pair in enumerate(zip(configs, batch)) if k in checked):
        alone = gf.simulate(cfg)
        assert trajectory.forward_prob.shape == alone.forward_prob.shape == (201, cfg.task.n - 1)
        for name in ("theta", "reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob"):
            np.testing.assert_allclose(getattr(trajectory, name), getattr(alone, name), rtol=1e-9, atol=1e-12, err_msg=name)
        for event, when in alone.events.items():
            assert trajectory.events[event] == (None if when is None else pytest.approx(when, rel=1e-8)), event


@pytest.mark.parametrize("cap", [None, 4])
def test_reach_read_outs_on_a_padded_task_equal_the_static_ones(cap):
    """``reach_per_start`` and ``reach_probability`` through the registry on a bucket's padded task (uncapped: ones
    on the chain's starts; capped, the laid-out model) equal the static task's, zeros past d = n - 1."""
    task, padded, model, laid_out = _laid_out_capped(5, cap or 1, False, 1)
    if cap is None:
        model = laid_out = gf.ModelSpec(mask_self=False, n_isolated=1, tau=0.3)
    names = ("reach_per_start", "reach_probability")
    theta = gf.Theta(1.0, -0.5, 0.2)
    want, got = readouts.read(names, theta, task, model), readouts.read(names, theta, padded, laid_out)
    np.testing.assert_allclose(np.asarray(got["reach_per_start"])[:4], want["reach_per_start"], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(got["reach_per_start"])[4:], 0.0)
    np.testing.assert_allclose(got["reach_probability"], want["reach_probability"], rtol=1e-12)
