"""Token-level sampling against the closed form: rollouts, REINFORCE estimates and training.

Every statistical check compares a Monte-Carlo mean with its exact value within Z standard errors;
the seeds are fixed, so a pass is reproducible, and a wrong model (a misplaced orbit, a wrong
normaliser, a biased baseline) moves the mean by many standard errors at these batch sizes.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import case_id, model_grid, random_theta, slow_case

import gradflow as gf
from gradflow import sampling
from gradflow.flow import FlowParams, simulate

Z = 4.0
BATCH = 20_000  # one batch size for every rollout check, so compiled samplers are reused


def max_len(n):
    """Generous truncation for the exact checks: softmax at tau 0.05 can walk ~30 steps on average."""
    return 100 * n


FAST_CASES = [  # (n, model): both attention kinds, self-loops masked and kept, isolated vertices
    (3, gf.ModelSpec("linear")),
    (3, gf.ModelSpec("softmax", mask_self=False)),
    slow_case((5, gf.ModelSpec("softmax", tau=0.05, n_isolated=2))),
    slow_case((8, gf.ModelSpec("linear", mask_self=False))),
]
SLOW_CASES = [  # softmax at the authors' tau = 0.05 self-loops for hundreds of steps unless masked
    (n, gf.ModelSpec(**kw, tau=0.05 if kw["attention"] == "softmax" and kw["mask_self"] else 0.2))
    for n in (3, 5, 8)
    for kw in model_grid()
]


def draw_theta(rng):
    """A random Theta around the learning regime: alpha in [0.2, 1], the others N(0, 0.3^2).

    Far outside it (alpha << gamma, or a softmax start row fixed on its own token) walks get long
    and tests would mostly measure truncation at max_len.
    """
    return gf.Theta(rng.uniform(0.2, 1.0), *rng.normal(0.0, 0.3, size=4))


def assert_binomial(successes, count, p, label):
    """successes ~ Binomial(count, p): within Z standard errors, or, where the normal law fails
    (count * min(p, 1 - p) < 10), by the exact two-sided binomial test at the same level.  Always asserts."""
    from scipy.stats import binomtest, norm

    assert count >= 1, f"{label}: no samples (raise the batch)"
    if count * min(p, 1.0 - p) < 10:
        p_value = binomtest(int(round(successes)), int(count), min(max(float(p), 0.0), 1.0)).pvalue
        assert p_value > 2.0 * norm.sf(Z), f"{label}: {successes}/{count} vs p = {p:.3g} (exact p-value {p_value:.2g})"
        return
    z = (successes - count * p) / np.sqrt(count * p * (1.0 - p))
    assert abs(z) < Z, f"{label}: {successes}/{count} vs p = {p:.5f} (z = {z:.2f})"


@eqx.filter_jit
def per_start(theta, task, model):
    """Closed-form success, length and exact-traversal probabilities per start (one compilation)."""
    return tuple(f(theta, task, model) for f in (gf.same_side_probability, gf.length_per_start, gf.traversal_per_start))


def check_rollouts_match_closed_form(n, model, theta, key):
    task = gf.ChainTask.uniform(n)
    A = sampling.full_attention(theta, 2 * n + model.n_isolated)
    ro = jax.device_get(sampling.rollouts(A, task, model, key, BATCH, max_len(n)))
    assert not ro.truncated.any(), "a walk hit max_len: the test theta is too slow"
    h, length, traversal = jax.device_get(per_start(theta, task, model))
    for d in range(1, n):
        at_d = ro.distances == d
        count = int(at_d.sum())
        assert_binomial(ro.rewards[at_d].sum(), count, h[d - 1], f"success rate at d={d}")
        assert_binomial(ro.traversed[at_d].sum(), count, traversal[d - 1], f"exact traversal at d={d}")
        lengths = ro.lengths[at_d]
        z = (lengths.mean() - length[d - 1]) / (lengths.std(ddof=1) / np.sqrt(count))
        assert abs(z) < Z, f"mean length at d={d}: {lengths.mean():.4f} vs {length[d - 1]:.4f} (z = {z:.2f})"


# --------------------------------------------------------------------------------------------------
# The vocabulary
# --------------------------------------------------------------------------------------------------


def test_full_attention_puts_each_number_on_its_orbit(rng):
    n_vocab = 5
    theta = random_theta(rng)
    alpha, beta, gamma, eta, delta = np.asarray(theta.as_array())
    A = np.asarray(sampling.full_attention(theta, n_vocab))
    assert A.shape == (n_vocab, n_vocab + n_vocab * (n_vocab - 1))
    columns = [("vertex", w) for w in range(n_vocab)]
    columns += [("edge", (x, y)) for x in range(n_vocab) for y in range(n_vocab) if x != y]
    for u in range(n_vocab):
        for c, (kind, token) in enumerate(columns):
            if kind == "vertex":
                expected = eta if token == u else delta
            else:
                expected = alpha if token[0] == u else beta if token[1] == u else gamma
            assert A[u, c] == expected, f"A[{u}, {kind} {token}] = {A[u, c]}, expected {expected}"
            if kind == "edge":
                assert sampling.edge_column(*token, n_vocab) == c


def test_orbit_statistics_recover_the_five_numbers(rng):
    theta = random_theta(rng)
    mean, std = sampling.orbit_statistics(sampling.full_attention(theta, 7))
    np.testing.assert_allclose(mean, theta.as_array(), atol=1e-14)
    np.testing.assert_allclose(std, 0.0, atol=1e-14)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        slow_case(dict(mask_self=False, n_isolated=2)),
        slow_case(dict(attention="softmax", n_isolated=1)),
        slow_case(dict(attention="softmax", mask_self=False, tau=0.05)),
    ],
)
def test_token_level_transition_matrix_is_the_row_structure(kw, rng):
    """The token-level policy (full attention matrix, random labels, one-hot tokens) has the transition
    matrix that ``gradflow.policy``'s row structure c(u, v) . s(u) gives (``model.transition_matrix``)."""
    n, model = 5, gf.ModelSpec(**kw)
    n_vocab = 2 * n + model.n_isolated
    theta = random_theta(rng)
    inst = sampling.sample_instances(gf.ChainTask.uniform(n), n_vocab, jax.random.PRNGKey(3), 4)
    for labels, columns, start in zip(inst.labels, inst.edge_columns, inst.start):
        tokens = sampling.transition_log_probs(sampling.full_attention(theta, n_vocab), labels, columns, start, n, model)
        rows = gf.transition_matrix(theta, n, model, start=int(start) + 1)
        np.testing.assert_allclose(np.exp(tokens), rows, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Rollouts against the closed form (the brute-force check of the whole abstraction)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FAST_CASES, ids=case_id)
def test_rollouts_match_closed_form(case, rng):
    n, model = case
    for k in range(2):
        check_rollouts_match_closed_form(n, model, draw_theta(rng), jax.random.key(k))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_rollouts_match_closed_form_full_grid(case, rng):
    n, model = case
    for k in range(4):
        check_rollouts_match_closed_form(n, model, draw_theta(rng), jax.random.key(k))


def test_larger_vocabulary_acts_as_isolated_vertices(rng):
    """Unused vocabulary tokens are extra isolated vertices: N = 2n + 3 equals n_isolated = 3."""
    n, theta = 3, draw_theta(rng)
    task = gf.ChainTask.uniform(n)
    ro = sampling.rollouts(sampling.full_attention(theta, 2 * n + 3), task, gf.ModelSpec(), jax.random.key(3), BATCH, max_len(n))
    expected = per_start(theta, task, gf.ModelSpec(n_isolated=3))[0]
    for d in range(1, n):
        at_d = np.asarray(ro.distances == d)
        assert_binomial(float(ro.rewards[at_d].sum()), int(at_d.sum()), float(expected[d - 1]), f"d={d}")


def test_rollout_fields_are_consistent(rng):
    n, model = 5, gf.ModelSpec("softmax", context="history")
    theta = draw_theta(rng)
    A = sampling.full_attention(theta, 2 * n)
    ro = jax.device_get(sampling.rollouts(A, gf.ChainTask.uniform(n), model, jax.random.key(0), 500, max_len=30))
    steps = np.arange(30)[None, :]
    assert np.array_equal(ro.paths >= 0, steps < ro.lengths[:, None]), "paths must be padded with -1 after the end"
    assert np.all(ro.rewards[ro.truncated] == 0.0) and np.all(ro.lengths[ro.truncated] == 30)
    last = ro.paths[np.arange(500), np.maximum(ro.lengths - 1, 0)]
    terminal_tokens = ro.labels[:, [n - 1, 2 * n - 1]]
    done = ~ro.truncated
    assert np.all((last[:, None] == terminal_tokens).any(axis=1)[done]), "a finished path must end on a terminal"
    np.testing.assert_array_equal(ro.rewards[done], (last == terminal_tokens[:, 0])[done])
    replay = jax.jit(jax.vmap(lambda lab, p, s: sampling.path_log_prob(A, lab, p, s, n, model)))(
        ro.labels, ro.paths, n - ro.distances - 1
    )
    np.testing.assert_allclose(replay, ro.log_probs, rtol=1e-10, atol=1e-10)


def test_history_context_changes_nothing_under_linear_attention(rng):
    n, theta = 3, draw_theta(rng)
    A, task = sampling.full_attention(theta, 2 * n), gf.ChainTask.uniform(n)
    prompt = sampling.rollouts(A, task, gf.ModelSpec(), jax.random.key(1), BATCH, max_len(n))
    history = sampling.rollouts(A, task, gf.ModelSpec(context="history"), jax.random.key(1), BATCH, max_len(n))
    np.testing.assert_array_equal(prompt.paths, history.paths)
    np.testing.assert_allclose(prompt.log_probs, history.log_probs, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Reward and REINFORCE gradient estimates
# --------------------------------------------------------------------------------------------------


def check_estimates(n, model, theta, key):
    task = gf.ChainTask.uniform(n)
    key_reward, key_grad = jax.random.split(key)
    x = theta.as_array()
    exact = gf.expected_reward(theta, task, model)
    exact_grad = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))(x)
    mean, stderr = sampling.estimate_reward(theta, task, model, key_reward, BATCH, max_len(n))
    assert abs(mean - exact) < Z * stderr, f"reward {mean:.4f} +- {stderr:.4f} vs exact {exact:.4f}"
    grad, grad_stderr = sampling.estimate_gradient(theta, task, model, key_grad, BATCH, max_len(n))
    if model.attention == "linear":  # eta, delta never enter the logits: every sample's score is 0
        np.testing.assert_array_equal(grad[3:], 0.0)
        grad, grad_stderr, exact_grad = grad[:3], grad_stderr[:3], exact_grad[:3]
    z = (grad - exact_grad) / grad_stderr
    assert np.all(np.abs(z) < Z), f"REINFORCE {grad} +- {grad_stderr} vs exact {exact_grad} (z = {z})"
    return grad, grad_stderr, exact_grad


@pytest.mark.parametrize("case", [FAST_CASES[0], pytest.param(FAST_CASES[1], marks=pytest.mark.slow)], ids=case_id)
def test_estimates_match_exact_reward_and_gradient(case, rng):
    """Sampled reward and REINFORCE gradient within Z standard errors of the closed form: one random theta in the default
    run (``test_gradient_estimate_pins_the_scale`` adds the base model's), two in the slow case, three per grid case
    in ``test_estimates_match_exact_reward_and_gradient_full_grid``."""
    n, model = case
    for k in range(1 if case is FAST_CASES[0] else 2):
        check_estimates(n, model, draw_theta(rng), jax.random.key(10 + k))


def test_gradient_estimate_pins_the_scale():
    """At the base model the estimate is precise enough that a factor 1.5 error would be > 4 SE off."""
    n, model = FAST_CASES[0]
    grad, stderr, exact = check_estimates(n, model, gf.Theta(0.3, 0.0, 0.0), jax.random.key(4))
    assert stderr[0] < 0.1 * abs(exact[0]), f"alpha gradient {exact[0]} vs standard error {stderr[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_estimates_match_exact_reward_and_gradient_full_grid(case, rng):
    n, model = case
    for k in range(3):
        check_estimates(n, model, draw_theta(rng), jax.random.key(10 + k))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


UNIFORM_4 = FlowParams(task=gf.ChainTask.uniform(4), t1=10.0)


def flow_at(config, ts):
    """The reference flow of ``config`` saved at ``ts`` (tight tolerances; one compilation per shape)."""
    config = config.replace(save_ts=jnp.asarray(ts), t1=float(ts[-1]), rtol=1e-9, atol=1e-11)
    return simulate(config, progress=False)


@pytest.mark.slow
def test_exact_gradient_descent_follows_the_flow():
    """GD with step lr is the flow sampled at t = lr k, up to O(lr) (here 1.5e-4 at lr = 1e-3)."""
    lr, steps = 1e-3, 2000
    descent = sampling.gradient_descent(UNIFORM_4, lr, steps)
    flow = flow_at(UNIFORM_4, descent.ts[::50])
    error = np.max(np.abs(descent.theta[::50] - flow.theta))
    assert error < 1e-3, f"GD departs from the flow by {error}"
    assert descent.reward[-1] > descent.reward[0] + 0.3, "the comparison must span real learning"
    np.testing.assert_allclose(descent.reward[::50], flow.reward, atol=1e-3)


def check_reinforce_follows_the_flow(lr, steps, batch, seeds, min_reward):
    """Mean closed-form reward over seeds of sampled SGD vs the flow at t = lr k.

    Band at step k (4 sigma): theta after k noisy steps is off by lr sqrt(k) SE_g (SE_g: per-step
    gradient standard error, measured at theta0 by ``estimate_gradient`` with the same batch), so J
    is off by sigma_k = lr sqrt(k) |SE_g * grad J| per seed and sigma_k / sqrt(seeds) for the mean;
    plus the deterministic O(lr) gap between gradient descent and the flow: at lr = 0.05 it is at
    most 0.0072 in J on this run (``gradient_descent`` against ``simulate``), so 0.15 * lr is allowed.
    """
    runs = [sampling.train(UNIFORM_4, lr, steps, batch, jax.random.key(s)) for s in range(seeds)]
    flow = flow_at(UNIFORM_4, runs[0].ts)
    task, model, x0 = UNIFORM_4.task, UNIFORM_4.model, UNIFORM_4.theta0
    _, se_grad = sampling.estimate_gradient(x0, task, model, jax.random.key(99), batch)
    grad_j = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))(x0.as_array())
    sigma = lr * np.sqrt(np.arange(steps + 1)) * np.linalg.norm(se_grad * grad_j) / np.sqrt(seeds)
    band = 4.0 * sigma + 0.15 * lr
    mean_reward = np.mean([run.reward for run in runs], axis=0)
    gap = np.abs(mean_reward - flow.reward)
    assert np.all(gap <= band), f"sampled training leaves the flow band at t = {runs[0].ts[np.argmax(gap - band)]}"
    assert all(run.reward[-1] >= min_reward for run in runs), [run.reward[-1] for run in runs]
    assert flow.reward[-1] - flow.reward[0] > 10 * band[-1], "the band must be narrow against the learning"
    np.testing.assert_allclose(np.mean([run.sampled_reward for run in runs]), np.mean(mean_reward), atol=0.01)


@pytest.mark.slow
def test_reinforce_training_reaches_high_reward_along_the_flow():
    check_reinforce_follows_the_flow(lr=0.05, steps=40, batch=2000, seeds=3, min_reward=0.95)


@pytest.mark.slow
def test_reinforce_training_follows_the_flow_long():
    check_reinforce_follows_the_flow(lr=0.05, steps=200, batch=5000, seeds=5, min_reward=0.99)


@pytest.mark.slow
def test_full_matrix_training_stays_symmetric_in_expectation():
    """SGD on all of A from a symmetric start: orbit means follow the flow, spreads stay sampling noise.

    At a symmetric A the expected gradient is grad_k J / (N |orbit_k|) on every entry of orbit k
    (|orbit_k| per row, N rows), so one SGD step of rate lr moves theta_k by lr/N times the
    coords="full" vector field: the orbit means follow that flow at t = lr * step / N, i.e. exact
    gradient descent on it with step lr / N (which tracks the flow, see the test above) -- the
    reference here, so no discretisation slack is needed.
    Tolerance (alpha, beta, gamma; eta and delta get no gradient under linear attention): the orbit
    mean of the sampled gradient has the standard error of the reduced estimate divided by
    N |orbit_k|, so after k steps 4 sigma = 4 lr sqrt(k) SE_k / (N |orbit_k|).
    The within-orbit spread of A is a random walk of the per-entry gradient noise: about sqrt(k)
    times its first step (A_0 is symmetric, so the first step's spread is lr times the noise, which
    later shrinks as the policy sharpens); a systematic asymmetry (e.g. labels that are not uniformly
    random) would grow like k, to ~0.7 in alpha here, far above the bound (~0.15).
    """
    lr, steps, batch = 4.0, 20, 2000
    config = UNIFORM_4.replace(coords="full")
    n_vocab, sizes = config.vocabulary_size, n_vocab_sizes(config)
    run = sampling.train(UNIFORM_4, lr, steps, batch, jax.random.key(0), params="full")
    expected = sampling.gradient_descent(config, lr / n_vocab, steps)
    np.testing.assert_allclose(run.ts / n_vocab, expected.ts, rtol=1e-12)
    _, se = sampling.estimate_gradient(config.theta0, config.task, config.model, jax.random.key(99), batch)
    k = np.arange(steps + 1)[:, None]
    band = 4.0 * lr * np.sqrt(k) * se / sizes + 1e-12
    gap = np.abs(run.theta - expected.theta)
    assert np.all(gap[:, :3] <= band[:, :3]), f"orbit means leave the flow: gap {gap[-1]}, band {band[-1]}"
    assert expected.theta[-1, 0] - expected.theta[0, 0] > 5 * band[-1, 0], "alpha must move well beyond the band"
    assert abs(expected.reward[-1] - expected.reward[0]) > 0.2, "the comparison must span real learning"

    spread = run.theta_std[:, :3]
    assert np.all(spread[1] > 0), "the full matrix must feel the sampling noise"
    # 1.5: the per-step noise first grows by up to ~10% as the policy leaves the base model
    assert np.all(spread <= 1.5 * np.sqrt(k) * spread[1] + 1e-12), f"spread {spread[-1]} outgrows a random walk"
    np.testing.assert_array_equal(run.theta_std[:, 3:], 0.0)


def n_vocab_sizes(config):
    """N |orbit_k|: entries of A sharing each number over all N query rows."""
    return config.vocabulary_size * np.asarray(config.orbit_sizes())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    task, model, theta, key = gf.ChainTask.uniform(3), gf.ModelSpec(), gf.Theta(0.3, 0.0, 0.0), jax.random.key(0)
    config = FlowParams(task=task)
    A = sampling.full_attention(theta, 6)
    cases = [
        ("batch", lambda: sampling.rollouts(A, task, model, key, 0)),
        ("max_len", lambda: sampling.rollouts(A, task, model, key, 10, max_len=0)),
        ("n_vocab", lambda: sampling.rollouts(sampling.full_attention(theta, 5), task, model, key, 10)),
        ("n_vocab", lambda: sampling.rollouts(A, task, gf.ModelSpec(n_isolated=1), key, 10)),
        ("n_vocab", lambda: sampling.full_attention(theta, 1)),
        ("batch", lambda: sampling.estimate_gradient(theta, task, model, key, 1)),
        ("lr", lambda: sampling.train(config, 0.0, 5, 10, key)),
        ("steps", lambda: sampling.train(config, 0.1, 0, 10, key)),
        ("batch", lambda: sampling.train(config, 0.1, 5, 0, key)),
        ("optimizer", lambda: sampling.train(config, 0.1, 5, 10, key, optimizer="nonsense")),
        ("params", lambda: sampling.train(config, 0.1, 5, 10, key, params="half")),
        ("lr", lambda: sampling.gradient_descent(config, -1.0, 5)),
    ]
    for field, call in cases:
        with pytest.raises(ValueError, match=field):
            call()
