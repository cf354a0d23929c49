"""The six predictions of docs/THEORY.md §5, checked on exact gradient-flow trajectories.

Reference numbers quoted from docs/THEORY.md §5.7 come from an independent implementation; its learning times
were read on a log grid of ratio 1.14, so each is at most ~14% above the true time.  The default run
compiles the flow at n = 4, 8 (full trajectories) and the threshold solve at n = 6, 8, 10; the
slow tests (``pytest -m slow``) extend the scaling claims to n = 4..14 and the hardest-only
learning time to n = 20, 30, 40 (log-time solve on the exact closed form).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_case, solver_params
from reference import dense_capped

import gradflow as gf
from gradflow import ceilings, schedules, theory
from gradflow.flow import FlowParams, hitting_times, simulate
from gradflow.task import ChainTask

BASE = gf.Theta(0.3, 0.0, 0.0)
MODEL = gf.ModelSpec()
GRID = 1.15  # the log grid ratio of docs/THEORY.md §5.7 (1.14) plus rounding of its printed entries
FAST_NS = (6, 8, 10)
THEORY_TIMES = {  # n: (uniform, hardest only, 90% hardest + 10% d = 1), time to J >= 0.9
    4: (0.64, 0.96, 0.84),
    8: (1.65, 181.0, 3.2),
    12: (2.8, 2.5e6, 5.5),
    14: (3.7, 6.2e8, 7.2),
}


def easy(mass):
    return lambda n: ChainTask.mixture(n, mass)


def _on_grid(measured, quoted):
    """True when the docs/THEORY.md §5.7 entry ``quoted`` is a grid read-off (<= 15% above) of ``measured``."""
    return quoted / GRID <= measured <= quoted * 1.001


def _at_time(trajectory, t, column=None):
    """Interpolate a saved quantity linearly in log t (theta when column is None)."""
    keep = (trajectory.ts > 0) & np.isfinite(trajectory.reward)
    log_t = np.log(trajectory.ts[keep])
    values = trajectory.theta[keep] if column is None else getattr(trajectory, column)[keep]
    if values.ndim == 1:
        return float(np.interp(np.log(t), log_t, values))
    return np.array([np.interp(np.log(t), log_t, values[:, k]) for k in range(values.shape[1])])


@pytest.fixture(scope="module")
def uniform8():
    return simulate(FlowParams(ChainTask.uniform(8), t1=1e4), progress=False)


@pytest.fixture(scope="module")
def uniform4():
    return simulate(FlowParams(ChainTask.uniform(4), t1=1e4), progress=False)


@pytest.fixture(scope="module")
def short4(uniform4):
    # t1 = 0.03 (same compilation as uniform4): before the escape at t ~ 0.08
    return simulate(FlowParams(ChainTask.uniform(4), t1=0.03), progress=False)


@pytest.fixture(scope="module")
def fast_scaling():
    """Learning times to J = 0.9 at n = 6, 8, 10: hardest only, 10% and 30% mass on d = 1."""
    return {
        "hardest": theory.scaling(FAST_NS, ChainTask.hardest),
        0.1: theory.scaling(FAST_NS, easy(0.1)),
        0.3: theory.scaling(FAST_NS, easy(0.3)),
    }


# ---------------------------------------------------------------------------------------------------
# Prediction 1: escape from the plateau is carried by simple examples
# ---------------------------------------------------------------------------------------------------


def test_gradient_decays_geometrically_with_distance_at_base_model():
    norms = theory.gradient_by_distance(BASE, ChainTask.hardest(8), MODEL)  # (theta, task, model)
    assert np.array_equal(norms, theory.gradient_by_distance(BASE, 8, MODEL)), "an int n must give the same"
    quoted = np.array([0.87, 0.26, 0.065, 0.015, 3.3e-3, 6.9e-4, 1.4e-4])
    assert np.allclose(norms, quoted, rtol=0.05), f"gradient norms by d = 1..7: {norms}, docs/THEORY.md §5.1: {quoted}"
    ratios = norms[1:] / norms[:-1]
    assert np.all((ratios > 0.19) & (ratios < 0.31)), f"ratio per extra step: {ratios}"


def test_only_distance_one_carries_gradient_at_uniform_policy():
    norms = theory.gradient_by_distance(gf.Theta(0.0, 0.0, 0.0), 8, MODEL)
    assert abs(norms[0] - 0.2210) < 1e-3, f"d = 1 gradient norm {norms[0]} (docs/THEORY.md §5.1: 0.22)"
    assert np.all(norms[1:] < 1e-12), f"d >= 2 gradient norms {norms[1:]} (must vanish exactly)"
    # hence theta = 0 is a fixed point of hardest-only training, and not of uniform training
    grad = lambda task: np.asarray(jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, MODEL))(jnp.zeros(5)))
    hard, uniform = np.linalg.norm(grad(ChainTask.hardest(8))), np.linalg.norm(grad(ChainTask.uniform(8)))
    assert hard < 1e-12 < uniform, f"|grad J| at theta = 0: hardest-only {hard}, uniform {uniform}"
    # hardest-only training from theta = 0 never learns; with mass on d = 1 it does
    zero = gf.Theta(0.0, 0.0, 0.0)
    never = theory.learning_time(ChainTask.hardest(8), theta0=zero, t1=1e9)  # n = 8: the program of the tests below
    learns = theory.learning_time(ChainTask.mixture(8, 0.1), theta0=zero, t1=1e9)
    assert never is None and learns is not None, f"from theta = 0: hardest {never}, 10% on d = 1 {learns}"


@pytest.mark.slow
def test_distance_one_position_learns_first(uniform8):
    report = theory.phases(uniform8)
    first = report.order[0]
    assert first == 7, f"learning order {report.order}: the position next to the terminal (a7) should lead"
    assert report.order_groups[0] == (7,), f"a7 must lead alone, not tied: {report.order_groups}"
    assert report.position_times[6] < report.escape, (
        f"a7 crosses 0.5 at t = {report.position_times[6]}, before the escape at t = {report.escape}"
    )


# ---------------------------------------------------------------------------------------------------
# Prediction 2 (emergence) and 3 (convergence)
# ---------------------------------------------------------------------------------------------------


def test_emergence_of_forward_traversal(uniform8):
    tr = uniform8
    alpha, beta, gamma = tr.theta[-1, :3]
    assert alpha > 2.5 and gamma < -0.5 and beta <= 1e-3, f"theta(1e4) = {tr.theta[-1, :3]} from (0.3, 0, 0)"
    assert tr.forward_prob[-1].min() > 0.99, f"final forward probabilities {tr.forward_prob[-1]}"
    assert tr.forward_prob[0].max() < 0.5, f"initial forward probabilities {tr.forward_prob[0]}"
    assert tr.switch_prob[-1].max() < 1e-5, f"final switch probabilities {tr.switch_prob[-1]}"
    assert abs(tr.expected_length[-1] - tr.minimal_length) < 1e-3, (
        f"expected length {tr.expected_length[-1]} vs minimal {tr.minimal_length}"
    )
    assert tr.traversal_prob[-1] > 0.999, f"exact-traversal probability {tr.traversal_prob[-1]}"
    # docs/THEORY.md §5.7 at t = 100: alpha 1.95, gamma -0.62, beta ~ -0.025, J = 0.9996; J = 0.9 at t = 1.465
    at100 = _at_time(tr, 100.0)
    assert np.allclose(at100[:3], [1.95, -0.025, -0.62], atol=0.02), f"theta(100) = {at100[:3]}"
    assert abs(_at_time(tr, 100.0, "reward") - 0.9996) < 1e-4, f"J(100) = {_at_time(tr, 100.0, 'reward')}"
    assert abs(tr.events["reward_threshold"] - 1.465) < 1e-3, f"t(J = 0.9) = {tr.events['reward_threshold']}"


def test_convergence_gap_grows_logarithmically(uniform8):
    report = theory.phases(uniform8)
    assert report.final_reward > 0.99999, f"J(1e4) = {report.final_reward}"
    assert report.convergence is not None and report.convergence < 100, f"t(loss < 1e-3) = {report.convergence}"
    # alpha - gamma ~ tau log t in the late phase: a slope near tau = 0.2 per unit of log t
    assert 0.15 < report.gap_slope < 0.3, f"d(alpha - gamma)/d log t = {report.gap_slope}"
    gap = uniform8.theta[:, 0] - uniform8.theta[:, 2]
    assert np.all(np.diff(gap[uniform8.ts > 10]) > 0), "the gap alpha - gamma keeps growing"


def test_phases_in_order(uniform4, uniform8):
    for tr in (uniform4, uniform8):
        r = theory.phases(tr)
        assert r.escape < r.emergence < r.traversal < r.convergence, str(r)
        assert all(t is not None for t in r.position_times), str(r)
        assert sorted(r.order) == list(range(1, tr.config.task.n)), str(r)
        times = [r.position_times[i - 1] for i in r.order]
        assert times == sorted(times), f"order {r.order} vs times {r.position_times}"
    assert abs(theory.phases(uniform8).convergence - uniform8.events["converged"]) < 1e-6


# ---------------------------------------------------------------------------------------------------
# Prediction 2, second half: reward alone does not select the algorithm
# ---------------------------------------------------------------------------------------------------


def test_slow_walk_earns_the_reward_with_long_chains_of_thought(uniform8):
    # alpha = beta: a symmetric walk on the chain; alpha - gamma = 3 makes jumps off the chain rare
    # (odds e^-15 per vertex).  A very negative gamma does not work here: at a_2 the predecessor a_1
    # has degree 1, so its logit lacks gamma and the walk is pushed back to a_1 (theta = (2, 2, -5)
    # gives J = 0.71 at n = 8).
    slow = gf.Theta(3.0, 3.0, 0.0)
    task = ChainTask.uniform(8)
    reward = float(gf.expected_reward(slow, task, MODEL))
    length = float(gf.expected_length(slow, task, MODEL))
    interior = np.asarray(gf.step_probabilities(slow, 8, MODEL).forward_given_move)[1:]
    assert reward > 0.9999, f"slow walk reward {reward}"
    assert np.allclose(interior, 0.5, atol=1e-4), f"slow walk forward probabilities {interior}"
    # the flow's solution, at the first save where it earns at least as much reward
    k = int(np.argmax(uniform8.reward >= reward))
    learned = uniform8.expected_length[k]
    assert uniform8.reward[k] >= reward and length > 5 * learned, (
        f"slow walk: J = {reward:.6f}, length {length:.2f}; flow at t = {uniform8.ts[k]:.3g}: "
        f"J = {uniform8.reward[k]:.6f}, length {learned:.4f} (minimal {uniform8.minimal_length})"
    )
    assert np.all(np.diff(uniform8.expected_length[uniform8.ts > 1]) < 1e-12), "the flow shortens the chain"


# ---------------------------------------------------------------------------------------------------
# Predictions 4 and 5: learning times against n
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hardest_only_learning_time_grows_exponentially(fast_scaling):
    fit = fast_scaling["hardest"]
    ratios = fit.ratios()
    assert all(r > 10 for r in ratios[1:]), f"T = {fit.times} at n = {fit.ns}; ratios per +2: {ratios}"
    assert fit.better == "exponential", str(fit)
    assert fit.factor > 3, f"fitted growth per unit n: x{fit.factor:.3g}\n{fit}"
    assert _on_grid(fit.times[1], THEORY_TIMES[8][1]), f"T(n = 8) = {fit.times[1]}, docs/THEORY.md §5.7 {THEORY_TIMES[8][1]}"


@pytest.mark.slow
def test_easy_mass_makes_learning_time_polynomial(fast_scaling):
    fit, more = fast_scaling[0.1], fast_scaling[0.3]
    assert fit.degree <= 2 and fit.better == "power", str(fit)
    assert _on_grid(fit.times[1], THEORY_TIMES[8][2]), f"T(n = 8) = {fit.times[1]}, docs/THEORY.md §5.7 {THEORY_TIMES[8][2]}"
    hard = fast_scaling["hardest"].times
    for n, t_low, t_high, t_hard in zip(FAST_NS, fit.times, more.times, hard):
        assert t_high < t_low < t_hard, f"n = {n}: T(c = 0.3) = {t_high}, T(c = 0.1) = {t_low}, hardest {t_hard}"
        assert t_low / t_high <= 3.0, f"n = {n}: T grows faster than 1/c: {t_low} / {t_high}"


@pytest.mark.parametrize("solver", solver_params())
def test_learning_time_matches_flow_event_and_reports_unreached(solver):
    t = theory.learning_time(ChainTask.hardest(8), solver=solver)
    assert _on_grid(t, 181.0), f"hardest n = 8: {t}"
    # issue 23.1: the plateau (until J covers a tenth of the way to 1) and the rise, on one clock
    assert 0.0 < t.rise < t.plateau < t and t.plateau + t.rise == pytest.approx(t, rel=1e-9), (t.plateau, t.rise)
    assert theory.learning_time(ChainTask.hardest(8), t1=10.0, solver=solver) is None
    assert theory.learning_time(ChainTask.uniform(8), theta0=gf.Theta(5.0, 0.0, -2.0), solver=solver) == 0.0


@pytest.mark.slow
def test_hardest_only_exponential_up_to_n14():
    ns = (4, 6, 8, 10, 12, 14)
    fit = theory.scaling(ns, ChainTask.hardest)
    print(fit)
    ratios = fit.ratios()
    assert all(r > 10 for r in ratios[2:]), f"T = {fit.times}; ratios per +2 in n: {ratios}"
    assert fit.better == "exponential" and fit.exp_rss < fit.power_rss, str(fit)
    for n, t in zip(ns, fit.times):
        if n in THEORY_TIMES:
            assert _on_grid(t, THEORY_TIMES[n][1]), f"n = {n}: T = {t}, docs/THEORY.md §5.7 {THEORY_TIMES[n][1]}"


@pytest.mark.slow
def test_hardest_only_learning_times_to_n40_restart_the_clock():
    """n = 24, 30, 40: the rise lasts a few time units at t ~ 1e22..1e49, below one ulp of t; the linear-time
    segments restart the clock, so each is resolved (before: steps ran out at n = 24, t = 4.56e22)."""
    t24, t30, t40 = theory.learning_times([ChainTask.hardest(n) for n in (24, 30, 40)], t1=1e100)
    assert t24 == pytest.approx(4.5646124940e22, rel=1e-6), t24
    assert t30 == pytest.approx(1.2508861630e32, rel=1e-6), t30
    assert t40 == pytest.approx(1.1708223037e49, rel=1e-6), t40
    # the rise (J from 0.55 to 0.9) lasts a few time units, kept to every digit by the segments' own clocks
    for t in (t24, t30, t40):
        assert 0.0 < t.rise < 100.0 and t.plateau == pytest.approx(t, rel=1e-12), (t, t.plateau, t.rise)
    # the exponential law keeps steepening: d log T / dn at n 20-24, 24-30, 30-40
    local = np.diff(np.log([5.907495200e16, t24, t30, t40])) / np.diff([20, 24, 30, 40])
    assert np.all(np.diff(local) > 0) and local[0] > 3.15, local


@pytest.mark.slow
def test_learning_times_of_the_phase_diagram_column_at_n240():
    """The full phase diagram's n = 240 column (33 masses, t1 = 1e8) failed with "maximum number of steps reached
    in the nonlinear solver" at c = 1.81e-4, J = 0.5001: a growth event at t ~ 3e5 whose condition moves more than
    EVENT_ATOL per ulp of t spun its bisection (``BracketBisection``); alone the mass was learned at 304453.86."""
    cs = (0.0, *np.logspace(-4, 0, 32))
    times = theory.learning_times([ChainTask.mixture(240, c) for c in cs], t1=1e8)
    assert times[0] is None and all(t is not None for t in times[1:]), times
    assert times[3] == pytest.approx(304453.861075, rel=1e-9), times[3]
    assert np.all(np.diff(np.asarray(times[1:], dtype=float)) < 0)  # more easy mass, sooner


@pytest.mark.slow
def test_hardest_only_learning_time_far_past_1e12():
    # log-time solve on the exact closed form (the true plateau gradient at n = 20 is ~1e-19); the
    # two solves before (t in one piece, round-off gradients) gave nothing past n ~ 16
    t16 = theory.learning_time(ChainTask.hardest(16), t1=1e100)
    t20 = theory.learning_time(ChainTask.hardest(20), t1=1e100)
    assert t16 == pytest.approx(1.9732965820e11, rel=1e-6), t16
    assert t20 == pytest.approx(5.907495184e16, rel=1e-6), t20
    fit = theory.fit_scaling([8, 12, 14, 16, 20], [170.5, 2.297e6, 5.609e8, t16, t20])
    assert fit.better == "exponential" and 2.5 < fit.rate < 3.1, str(fit)
    # the local rate d log T / dn keeps growing: 2.38 (n 8-12), 2.75, 2.93, 3.15 (n 16-20)
    local = np.diff(np.log([170.5, 2.297e6, 5.609e8, t16, t20])) / np.diff([8, 12, 14, 16, 20])
    assert np.all(np.diff(local) > 0), local


@pytest.mark.slow
def test_learning_time_raises_when_max_steps_run_out():
    with pytest.raises(RuntimeError, match="max_steps"):
        theory.learning_time(ChainTask.hardest(8), max_steps=20)


def test_small_buckets_share_one_learning_time_program():
    """In one learning_times call every bucket of n up to SHARED_PROGRAM_UP_TO (32) shares a group, so one program;
    larger buckets and configs that cannot be bucketed (n itself) keep their own."""
    group = lambda task, **kwargs: theory._bucket_of(gf.FlowParams(task, **kwargs))
    small = {group(ChainTask.uniform(n)) for n in (3, 4, 5, 8, 9, 17, 32)}
    assert small == {("buckets up to", theory.SHARED_PROGRAM_UP_TO)} and theory.SHARED_PROGRAM_UP_TO == 32
    assert group(ChainTask.uniform(33)) == ("bucket", 64) and group(ChainTask.uniform(100)) == ("bucket", 128)
    assert group(ChainTask.uniform(8), model=gf.ModelSpec("softmax")) == ("n", 8)  # softmax: compiled per n


@pytest.mark.slow
def test_a_single_learning_time_compiled_without_the_while_loop_passes_gives_the_same_numbers():
    """A single learning time's program is compiled without XLA's while-loop passes (less compile time only): its
    outputs equal the same program's compiled with them, bit for bit."""
    from gradflow import compile_cache

    config = gf.FlowParams(ChainTask.mixture(8, 0.1), t1=theory.DEFAULT_T1)
    request = theory._learning_request(config, config.task)
    assert request.quick and not request.loop_passes
    without, with_them = (compile_cache.compiled(*request._replace(loop_passes=flag))[0](*request.args) for flag in (False, True))
    jax.tree_util.tree_map(np.testing.assert_array_equal, without, with_them)
    assert bool(without[1]), "the level is reached"


def test_start_rewards_are_one_batch_and_a_level_reached_at_theta0_takes_no_solve():
    """learning_times reads J(theta0) of every task from one vmapped program (n as data: n = 4 and 40 laid out at 64;
    softmax, not bucketable, per n; a task alone in its group eagerly), equal to the eager closed form; a level
    J(theta0) already reaches takes time t0, with no learning-time program compiled."""
    from gradflow import compile_cache

    tasks = [ChainTask.uniform(4), ChainTask.mixture(40, 0.3), ChainTask.hardest(7), ChainTask.mixture(7, 0.5)]
    for model in (gf.ModelSpec(), gf.ModelSpec("softmax")):
        configs = theory._learning_configs(tasks, model, None, 0.3, 1e8, {})
        jobs = [(i, None, cfg.task) for i, cfg in enumerate(configs)]
        eager = [float(gf.expected_reward(cfg.theta0, cfg.task, model)) for cfg in configs]
        np.testing.assert_allclose(theory._start_rewards(configs, jobs), eager, rtol=1e-12)
        assert min(eager) > 0.3
    before = compile_cache.compilation_count()
    times = theory.learning_times(tasks, level=0.3)
    assert [(float(t), t.plateau, t.rise) for t in times] == [(0.0, 0.0, 0.0)] * 4
    assert compile_cache.compilation_count() == before  # the start rewards' program is the one above


def test_learning_times_over_several_buckets_compile_their_programs_side_by_side(empty_compile_cache, capsys, monkeypatch):
    """Tasks of two buckets of n (4 and 8; buckets kept apart here: SHARED_PROGRAM_UP_TO = 4) in one call: one program
    per bucket, compiled together on a thread per core (``compile_cache.run_together``: each bucket's solves run as
    soon as its program is ready), and each time equal to the one its bucket's call alone gives (the same program);
    ``progress`` reports the programs and each bucket's solves.  (One task per bucket: n = 8's program is the other
    tests' ``learning_time`` program.)"""
    from gradflow import compile_cache

    monkeypatch.setattr(theory, "SHARED_PROGRAM_UP_TO", 4)
    tasks = [ChainTask.mixture(4, 0.1), ChainTask.uniform(8)]
    before = compile_cache.compilation_count()
    together = theory.learning_times(tasks, progress=True)
    assert compile_cache.compilation_count() - before == 3  # the start rewards' program and one per bucket
    report = capsys.readouterr().err
    assert "2 programs (one per bucket of n), compiled side by side" in report and report.count("solves in") == 2
    alone = [theory.learning_time(task) for task in tasks]
    assert compile_cache.compilation_count() - before == 3  # the same two programs (one task: J(theta0) eagerly)
    np.testing.assert_array_equal(np.array(together, dtype=float), np.array(alone, dtype=float))


@pytest.mark.slow
def test_easy_mass_polynomial_up_to_n14():
    ns = (4, 6, 8, 10, 12, 14)
    tasks = [task for n in ns for task in (ChainTask.uniform(n), ChainTask.mixture(n, 0.1), ChainTask.mixture(n, 0.3))]
    times = np.array(theory.learning_times(tasks), dtype=float).reshape(len(ns), 3)  # batched per n
    fit = theory.fit_scaling(ns, times[:, 1])
    print(fit)
    assert fit.degree <= 2 and fit.better == "power", str(fit)
    assert np.all(times[:, 2] < times[:, 1]), f"c = 0.3 {times[:, 2]} vs c = 0.1 {times[:, 1]}"
    for n, (t_uniform, t_mixture) in zip(ns, times[:, :2]):
        if n in THEORY_TIMES:
            quoted_uniform, _, quoted_mixture = THEORY_TIMES[n]
            assert _on_grid(t_uniform, quoted_uniform), f"uniform n = {n}: {t_uniform} vs {quoted_uniform}"
            assert _on_grid(t_mixture, quoted_mixture), f"mixture n = {n}: {t_mixture} vs {quoted_mixture}"


# ---------------------------------------------------------------------------------------------------
# Exact read-outs: learning times in log time, phase times root-found on the solution
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_log_time_learning_time_matches_the_flow_event(uniform8):
    # the flow steps in t and root-finds its event; learning_time steps in s = log(1 + t)
    t = theory.learning_time(ChainTask.uniform(8))
    event = uniform8.events["reward_threshold"]
    assert abs(t / event - 1) < 1e-6, f"learning_time {t} vs the flow's event {event}"
    escape = theory.phases(uniform8).escape  # the plateau's end is phases' escape (ceiling 1)
    assert t.plateau == pytest.approx(escape, rel=1e-6) and t.rise == pytest.approx(event - escape, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("easy_mass, level", [(1.0, 0.9), (0.5, 0.4)])
def test_learning_time_of_a_flow_that_starts_fast_matches_the_flow_event(easy_mass, level):
    """At tau = 0.2 with a cap the gradient at theta0 already moves theta faster than the log-time stage's hand-over
    speed: its condition starts below 0 and never falls through it, so that stage takes zero length (these two
    answered None, and ran out of max_steps at J = 0.74 > 0.4, before)."""
    task, capped = ChainTask.mixture(5, easy_mass), gf.ModelSpec(max_len=3)
    t = theory.learning_time(task, capped, level=level)
    (event,) = hitting_times([FlowParams(task, capped, reward_threshold=level, stop_at="threshold", t1=1e4)])
    assert t is not None and t == pytest.approx(event, rel=1e-6)
    assert t.plateau <= t


def test_position_times_are_root_found_not_read_off_the_saves(uniform8):
    report = theory.phases(uniform8)
    saves = set(np.asarray(uniform8.ts).tolist())
    assert not saves & set(report.position_times), f"a position time is a save time: {report.position_times}"
    # a7: the root of the forward probability, as Trajectory.t_hit root-finds it
    t7 = uniform8.t_hit(0.5, quantity="forward_prob", index=6)
    assert abs(report.position_times[6] / t7 - 1) < 1e-8, f"a7: phases {report.position_times[6]}, t_hit {t7}"
    # emergence is when the last position crosses; the grid read-off is only close to it
    assert report.emergence == pytest.approx(max(report.position_times), rel=1e-8), str(report)
    grid = theory.phases(uniform8, exact=False)
    assert np.allclose(grid.position_times, report.position_times, rtol=0.02), f"{grid.position_times}"
    # the interior positions a3..a6 have identical rows under linear attention (same logits), so
    # they cross at the same time: the report ties them instead of inventing an order
    assert report.order_groups == ((7,), (1,), (3, 4, 5, 6), (2,)), str(report)
    assert np.ptp(uniform8.forward_prob[:, 2:6], axis=1).max() < 1e-12, "a3..a6 identical at every save"
    assert "a7, a1, (a3 = a4 = a5 = a6), a2" in str(report), str(report)


def test_learning_order_claims_only_what_the_times_resolve():
    groups = theory._order_groups((3.0, 1.0, 1.0 + 1e-9, None, 2.0), 1e-6)
    assert groups == ((2, 3), (5,), (1,)), groups
    assert theory._order_groups((3.0, 1.0, 1.0 + 1e-9, None, 2.0), 0.0) == ((2,), (3,), (5,), (1,))
    report = theory.PhaseReport(
        n=6,
        t_end=10.0,
        final_reward=0.99,
        escape=1.0,
        emergence=3.0,
        traversal=None,
        convergence=None,
        position_times=(3.0, 1.0, 1.0 + 1e-9, None, 2.0),
        order=(2, 3, 5, 1),
        gap_slope=None,
        escape_level=0.6,
        convergence_loss=1e-3,
        order_groups=groups,
    )
    assert "(a2 = a3), a5, a1" in str(report) and not report.order_is_strict, str(report)


# ---------------------------------------------------------------------------------------------------
# The reward ceiling (issue 14.7)
# ---------------------------------------------------------------------------------------------------


def test_max_reward_linear_attention_exact():
    assert theory.max_reward(ChainTask.uniform(8)) == 1.0
    assert theory.max_reward(ChainTask.hardest(8), gf.ModelSpec(max_len=7)) == 1.0  # the cap covers every start
    assert theory.reward_ceiling(ChainTask.mixture(8, 1.0), gf.ModelSpec(max_len=1)).exact
    # n = 2 with self-loops: the self-loop and the step to a_2 share the logit alpha for every theta
    assert theory.max_reward(ChainTask.uniform(2), gf.ModelSpec(max_len=3, mask_self=False)) == pytest.approx(7 / 8)
    two = gf.ModelSpec(max_len=3, mask_self=False)
    assert float(gf.expected_reward(gf.Theta(30.0, 0.0, -30.0), ChainTask.uniform(2), two)) == pytest.approx(7 / 8, abs=1e-12)


def test_starts_beyond_the_cap_succeed_by_jumps_so_the_ceiling_is_numerical():
    """A terminal has one edge, so at gamma << 0 a far jump lands on it: forward traversal's mass on d <= T is only
    a lower bound (hardest start, n = 5, cap 3: J = 0.48 at theta = (-1.69, -0.43, -4.05)), and no closed-form
    ceiling is claimed (so no level is refused on it)."""
    task, capped = ChainTask.hardest(5), gf.ModelSpec(max_len=3)
    jumping = float(gf.expected_reward(gf.Theta(-1.68808878, -0.43402112, -4.05257672), task, capped))
    assert jumping > 0.45
    ceiling = theory.reward_ceiling(task, capped)
    assert not ceiling.exact and ceiling.value >= jumping - 1e-9
    assert float(gf.expected_reward(gf.Theta(*ceiling.theta[:3]), task, capped)) == pytest.approx(ceiling.value, abs=1e-12)
    assert ceilings.closed_form_ceiling(task, capped) is None
    mixed = theory.reward_ceiling(ChainTask.uniform(8), gf.ModelSpec(max_len=4))
    assert not mixed.exact and mixed.value >= 4 / 7  # never below forward traversal's mass on d <= 4
    assert ceilings.closed_form_ceiling(ChainTask.uniform(8), gf.ModelSpec(max_len=4)) is None


def test_max_reward_capped_linear_against_brute_force():
    task, model = ChainTask.uniform(6), gf.ModelSpec(max_len=4, mask_self=False)
    ceiling = theory.max_reward(task, model)
    assert ceiling >= 4 / 5
    best, theta = ceilings._numerical_max_reward(task, model, n_starts=3, seed=1)  # another set of starts
    assert best <= ceiling + 1e-9, f"numerical maximum {best} at {theta}, ceiling {ceiling}"


def test_softmax_ceiling_is_the_alpha_limit():
    task = ChainTask.uniform(8)
    soft = gf.ModelSpec(attention="softmax", tau=0.2)
    ceiling = theory.reward_ceiling(task, soft)
    assert ceiling.exact and ceiling.value == pytest.approx(0.8381807686, abs=1e-10), str(ceiling)
    # the limit is approached from finite theta (alpha -> +inf, the rest finite)
    assert float(gf.expected_reward(gf.Theta(40.0, 0.0, 0.0), task, soft)) == pytest.approx(ceiling.value, abs=1e-12)
    assert theory.max_reward(task, gf.ModelSpec(attention="softmax", tau=0.1)) == pytest.approx(0.99855029677, abs=1e-10)
    assert theory.max_reward(task, gf.ModelSpec(attention="softmax", tau=1 / 20)) > 0.9999999


@pytest.mark.slow
@pytest.mark.parametrize("n, tau, mask_self", [(8, 0.2, True), (5, 0.1, False), (6, 1 / 20, True)])
def test_softmax_ceiling_no_theta_beats_it(n, tau, mask_self):
    # a brute-force multi-start maximisation over all five numbers never beats the alpha -> inf limit
    task = ChainTask.mixture(n, 0.3)
    soft = gf.ModelSpec(attention="softmax", tau=tau, mask_self=mask_self)
    ceiling = theory.reward_ceiling(task, soft)
    best, theta = ceilings._numerical_max_reward(task, soft, n_starts=6, seed=n)
    assert ceiling.value - 1e-7 < best <= ceiling.value + 1e-12, f"numerical {best} at {theta} vs {ceiling}"


@pytest.mark.slow
def test_capped_softmax_ceiling_numerical():
    # no closed form: the numerical maximum lies below the uncapped ceiling and approaches it as the cap grows
    task = ChainTask.uniform(4)
    uncapped = theory.max_reward(task, gf.ModelSpec(attention="softmax", tau=0.2))
    short = theory.reward_ceiling(task, gf.ModelSpec(attention="softmax", tau=0.2, max_len=4))
    long = theory.reward_ceiling(task, gf.ModelSpec(attention="softmax", tau=0.2, max_len=60))
    assert not short.exact and short.theta is not None, str(short)
    assert short.value < long.value <= uncapped + 1e-12 and long.value > uncapped - 1e-4, (short, long, uncapped)
    model = gf.ModelSpec(attention="softmax", tau=0.2, max_len=4)
    at = float(gf.expected_reward(gf.Theta(*short.theta), task, model))
    assert at == pytest.approx(short.value, abs=1e-12), "the reported argmax attains the value"
    rng = np.random.default_rng(1)
    for x in rng.normal(scale=4.0, size=(20, 5)):
        assert float(gf.expected_reward(gf.Theta.from_array(x), task, model)) <= short.value + 1e-12


def test_reward_ceiling_warning_and_reports():
    task = ChainTask.uniform(8)
    soft = gf.ModelSpec(attention="softmax", tau=0.2)
    message = theory.reward_ceiling_warning(task, 0.9, soft)
    assert message is not None and "0.838181" in message and "softmax" in message, message
    assert theory.reward_ceiling_warning(task, 0.8, soft) is None
    assert theory.reward_ceiling_warning(task, 0.9, gf.ModelSpec(attention="softmax", tau=1 / 20)) is None
    assert theory.reward_ceiling_warning(FlowParams(task), 0.999999) is None
    assert "max_len = 4" in theory.reward_ceiling_warning(task, 0.6, gf.ModelSpec(max_len=4))
    with pytest.warns(UserWarning, match="ceiling"):
        assert theory.learning_time(task, soft, level=0.9) is None
    report = theory.check_conditions(FlowParams(task, gf.ModelSpec(max_len=4)))
    assert report.ceiling == pytest.approx(4 / 7) and report.max_len == 4, str(report)
    assert "ceiling" in str(report) and "cap 4" in str(report), str(report)


# ---------------------------------------------------------------------------------------------------
# Finite rollouts at theta = 0 (issue 14.6)
# ---------------------------------------------------------------------------------------------------


# d h_d / d (alpha, beta, gamma) at theta = 0, cap n + 1, self-loops allowed, tau = 0.2: rows d = 1,
# then d = 2..n-2 (all equal), then d = n-1.  Measured here (4 digits) and checked against finite
# differences of dense matrix powers below.
CAPPED_GRADIENT_AT_ZERO = {
    5: ([0.2377, -0.1556, -0.6719], [-0.0942, -0.1556, -0.3400], [-0.0942, -0.1229, -0.3727]),
    8: ([0.1505, -0.1055, -0.7698], [-0.0594, -0.1055, -0.5599], [-0.0594, -0.0920, -0.5733]),
}


@pytest.mark.parametrize("n", [5, slow_case(8)])
def test_capped_gradient_at_zero_teaches_reaching_a_terminal_not_which(n):
    from gradflow import capped

    model = gf.ModelSpec(max_len=n + 1, mask_self=False)
    zero = gf.Theta(0.0, 0.0, 0.0)
    grad = theory.success_gradient(zero, ChainTask.uniform(n), model)
    first, middle, last = CAPPED_GRADIENT_AT_ZERO[n]
    expected = np.array([first] + [middle] * (n - 3) + [last])
    assert np.allclose(grad[:, :3], expected, atol=6e-5), f"capped d h_d/d theta at 0, n = {n}:\n{grad}"
    assert np.all(grad[:, 3:] == 0.0), "eta, delta carry nothing under linear attention"
    # unlike the uncapped gradient, every start carries signal, and for d >= 2 it points down in all
    # three numbers, gamma most: more weight on degree-1 vertices (the two terminals among them)
    assert np.all(grad[1:, :3] < -0.05), grad
    assert np.all(np.abs(grad[1:, 2]) > 3 * np.abs(grad[1:, 0])), grad
    norms = theory.gradient_by_distance(zero, n, model)
    assert np.allclose(norms, np.linalg.norm(grad, axis=1)) and np.all(norms > 0.3), norms
    uncapped = theory.gradient_by_distance(zero, n, gf.ModelSpec(mask_self=False))
    assert np.all(uncapped[1:] < 1e-12), uncapped
    # it is exactly half the gradient of reaching *any* terminal within the cap: no a/b information
    reach = np.asarray(
        jax.jacobian(lambda x: capped.reach_per_start(gf.Theta.from_array(x), ChainTask.uniform(n), model))(jnp.zeros(5))
    )
    assert np.allclose(grad[1:], reach[1:] / 2, atol=1e-12), grad[1:] - reach[1:] / 2
    # independent check: central differences of dense matrix powers
    eps = 1e-6
    for k in range(3):
        up, down = np.zeros(5), np.zeros(5)
        up[k], down[k] = eps, -eps
        fd = (
            dense_capped(gf.Theta.from_array(up), n, model, n + 1)[0]
            - dense_capped(gf.Theta.from_array(down), n, model, n + 1)[0]
        ) / (2 * eps)
        assert np.allclose(grad[:, k], fd, atol=1e-8), f"component {k}: {grad[:, k]} vs dense {fd}"


# ---------------------------------------------------------------------------------------------------
# Prediction 6: out of distribution
# ---------------------------------------------------------------------------------------------------


def test_parameters_learned_at_n4_solve_longer_chains(uniform4):
    learned = gf.Theta(*uniform4.theta[-1, :3])
    rewards = theory.extrapolate(learned, [8, 12, 32])
    assert all(rewards[n] >= 0.9999 for n in rewards), f"trained to t = 1e4: J by n = {rewards}"
    # docs/THEORY.md §5.7: trained to t = 100, theta = (1.74, -0.04, -0.51), J = 0.9996, 0.9987, 0.9976 at n = 4, 8, 12
    early = gf.Theta(*_at_time(uniform4, 100.0)[:3])
    rewards = theory.extrapolate(early, [4, 8, 12])
    assert np.allclose(list(rewards.values()), [0.9996, 0.9987, 0.9976], atol=2e-4), f"t = 100: {rewards}"
    # the reward degrades with n only through the switch probability, which grows with n
    switch = [float(np.max(gf.step_probabilities(early, n, MODEL).switch)) for n in (4, 8, 12)]
    forward = [float(np.min(gf.step_probabilities(early, n, MODEL).forward_given_move)) for n in (4, 8, 12)]
    assert switch[0] < switch[1] < switch[2] and rewards[4] > rewards[8] > rewards[12], f"switch {switch}"
    assert min(forward) > 0.99, f"forward-step probabilities at n = 4, 8, 12: {forward}"


# ---------------------------------------------------------------------------------------------------
# Condition reports, phase reports, validation
# ---------------------------------------------------------------------------------------------------


def test_check_conditions_against_step_probabilities():
    config = FlowParams(ChainTask.uniform(8))
    report = theory.check_conditions(config)
    steps = gf.step_probabilities(BASE, 8, MODEL)
    c0 = float(np.min(steps.forward))
    b0 = float(np.min(steps.forward - steps.backward))
    assert math.isclose(report.c0, c0, rel_tol=1e-12) and math.isclose(report.b0, b0, rel_tol=1e-12), str(report)
    assert math.isclose(report.c0, float(np.min(steps.forward_given_move)), rel_tol=1e-12)  # mask_self
    assert report.base_model and report.k == 1 and math.isclose(report.c, 1 / 7), str(report)
    assert np.allclose(report.simple_mass, np.arange(1, 8) / 7), str(report)
    expected = 8**2 / (c0**3 * b0 * (1 / 7) * 0.1**2)
    assert math.isclose(report.bound, expected, rel_tol=1e-12), f"bound {report.bound} vs {expected}"
    text = str(report)
    for piece in (f"{c0:.4g}", f"{b0:.4g}", "polynomial", f"{expected:.4g}", "holds"):
        assert piece in text, f"{piece!r} missing from:\n{text}"


def test_predicted_regimes():
    regime = lambda task, **kw: theory.check_conditions(FlowParams(task), **kw).regime
    assert regime(ChainTask.uniform(8)) == "polynomial"
    assert regime(ChainTask.mixture(12, 0.1)) == "polynomial"
    assert regime(ChainTask.mixture(12, 0.1, easy_steps=(3,))) == "polynomial"
    assert regime(ChainTask.hardest(8)) == "exponential"
    assert regime(ChainTask.k_hardest(8, 3)) == "exponential"
    assert regime(ChainTask.mixture(12, 0.1, easy_steps=(3,)), c0_floor=0.1) == "undetermined"
    flat = theory.check_conditions(FlowParams(ChainTask.uniform(8), theta0=gf.Theta(0.0, 0.0, 0.0)))
    assert not flat.base_model and flat.b0 == 0.0 and flat.bound == math.inf, str(flat)
    assert "FAILS" in str(flat)


def test_phases_none_for_what_did_not_happen(short4):
    report = theory.phases(short4)
    missing = (report.escape, report.emergence, report.traversal, report.convergence)
    assert missing == (None, None, None, None), str(report)
    assert report.position_times == (None, None, None) and report.order == (), str(report)
    assert report.t_end == pytest.approx(0.03)


def test_phase_report_text_and_grid_read_off(uniform4):
    exact, grid = theory.phases(uniform4), theory.phases(uniform4, exact=False)
    assert exact.order[0] == 3, str(exact)
    assert abs(grid.escape / exact.escape - 1) < 0.02 and abs(grid.convergence / exact.convergence - 1) < 0.02
    text = str(exact)
    for value in (exact.escape, exact.emergence, exact.traversal, exact.convergence, exact.gap_slope):
        assert f"{value:.4g}" in text, f"{value:.4g} missing from:\n{text}"
    assert "a3, a1, a2" in text, text


def test_scaling_fit_on_exact_laws():
    ns = [4, 6, 8, 10]
    power = theory.fit_scaling(ns, [3.0 * n**1.5 for n in ns])
    assert power.better == "power" and abs(power.degree - 1.5) < 1e-12 and power.power_rss < 1e-20
    expo = theory.fit_scaling(ns, [0.5 * math.exp(0.7 * n) for n in ns])
    assert expo.better == "exponential" and abs(expo.factor - math.exp(0.7)) < 1e-9
    assert "exponential" in str(expo) and f"{expo.rate:.4f}" in str(expo)
    assert expo.ratios() == pytest.approx([math.exp(1.4)] * 3)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: theory.check_conditions(FlowParams(ChainTask.uniform(4)), eps=0.0), "eps"),
        (lambda: theory.check_conditions(FlowParams(ChainTask.uniform(4)), c0_min=-0.1), "c0_min"),
        (lambda: theory.check_conditions(FlowParams(ChainTask.uniform(4)), b0_min=float("nan")), "b0_min"),
        (lambda: theory.check_conditions(FlowParams(ChainTask.uniform(4)), k_max=0), "k_max"),
        (lambda: theory.check_conditions("config"), "flow_params"),
        (lambda: theory.phases("trajectory"), "trajectory"),
        (lambda: theory.learning_time(ChainTask.uniform(4), level=1.0), "level"),
        (lambda: theory.learning_time(ChainTask.uniform(4), t1=-1.0), "t1"),
        (lambda: theory.learning_time("task"), "task"),
        (lambda: theory.learning_time(ChainTask.uniform(4), stop_at=None), "stop_at"),
        (lambda: theory.scaling([4, 4], ChainTask.hardest), "ns"),
        (lambda: theory.scaling([4, 5], lambda n: ChainTask.hardest(4)), "make_task"),
        (lambda: theory.fit_scaling([4, 6], [1.0, 2.0]), "times"),
        (lambda: theory.gradient_by_distance(BASE, 1), "n"),
        (lambda: theory.gradient_by_distance(BASE, "task"), "task"),
        (lambda: theory.reward_ceiling("task"), "task"),
        (lambda: theory.reward_ceiling(ChainTask.uniform(4), "model"), "model"),
        (lambda: theory.reward_ceiling_warning("config", 0.9), "config"),
        (lambda: theory.reward_ceiling_warning(ChainTask.uniform(4), 1.5), "level"),
        (lambda: theory.learning_time(ChainTask.uniform(4), theta0=(0.3, 0.0, 0.0)), "theta0"),
        (lambda: theory.extrapolate(BASE, [1]), "ns"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_phases_rejects_bad_levels(short4):
    with pytest.raises(ValueError, match="escape_fraction"):
        theory.phases(short4, escape_fraction=1.5)
    with pytest.raises(ValueError, match="convergence_loss"):
        theory.phases(short4, convergence_loss=0.0)
    with pytest.raises(ValueError, match="order_rtol"):
        theory.phases(short4, order_rtol=-1.0)


def test_no_arrays_at_import_and_default_theta0_alias():
    assert "DEFAULT_THETA0" not in vars(theory), "DEFAULT_THETA0 must be made on access, not at import"
    theta = theory.DEFAULT_THETA0
    assert np.array_equal(theta.as_array(), gf.Theta(0.3, 0.0, 0.0).as_array())


@pytest.mark.slow
def test_learning_time_of_a_step_schedule_matches_the_flow_event():
    # learning_time and the flow solve through one integrator: both end a step on the schedule's switch
    # (here at t = 5, on the plateau), so the two agree to the solver's tolerance
    n = 6
    step = schedules.Step(5.0, ChainTask.hardest(n).start_probs, ChainTask.uniform(n).start_probs)
    t = theory.learning_time(ChainTask.hardest(n), schedule=step, t1=1e4)
    config = FlowParams(ChainTask.hardest(n), t1=1e4, schedule=step, stop_at="threshold")
    event = hitting_times([config])[0]
    assert t is not None and t > 5.0
    assert abs(t / event - 1) < 1e-6, f"learning_time {t} vs the flow's event {event}"


@pytest.mark.slow
def test_eval_tasks_learning_times_and_phases_agree():
    """When the hardest start is learned while training on a mixture: learning_time and phases give one time."""
    n, train = 5, ChainTask.mixture(5, 0.3)
    evals = {"same": train, "hard": ChainTask.hardest(n)}
    times = theory.learning_time(train, eval_tasks=evals)
    assert isinstance(times, theory.TaskTimes) and times.train == pytest.approx(theory.learning_time(train), rel=1e-9)
    assert times.eval["same"] == pytest.approx(times.train, rel=1e-9) and times.eval["hard"] > times.train
    trajectory = gf.simulate(FlowParams(train, t1=20.0, eval_tasks={"hard": evals["hard"]}))
    report = theory.phases(trajectory, eval_tasks={"uni": ChainTask.uniform(n)})
    assert report.eval_times["hard"] == pytest.approx(times.eval["hard"], rel=1e-6)
    assert set(report.eval_times) == {"hard", "uni"} and "eval hard learned" in str(report)
    with pytest.raises(ValueError, match="n = 4"):
        theory.learning_time(train, eval_tasks={"short": ChainTask.hardest(4)})
