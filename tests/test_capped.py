"""The capped closed form (gradflow.capped) against dense matrix powers, finite differences, token-level
sampling and the uncapped closed form.

Dense reference: ``dense_capped`` of tests/reference.py, the token-built transition matrix
(``gradflow.model.transition_matrix``) with both terminals made absorbing, raised to the T-th power in
numpy: P(a_n within T tokens) is entry (start, a_n) of its T-th power, and E[min(L, T)] = sum_{k<T}
P(no terminal after k tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATTENTIONS, case_id, model_grid, random_theta
from reference import dense_capped

import gradflow as gf
from gradflow import capped, sampling

Z = 4.0
BATCH = 20_000


def closed(theta, task, model):
    """(success, reach, length, traversal) per start; checks failure = 1 - success on the way."""
    per = capped.per_start(theta, task, model)
    np.testing.assert_allclose(per.failure, 1.0 - per.success, rtol=0, atol=1e-13)
    return np.stack([np.asarray(x) for x in per[:4]])


CASES = [  # (n, cap, model kwargs): both attentions, self-loops masked and kept, isolated vertices
    (5, 6, dict(attention="linear", mask_self=False)),
    (4, 3, dict(attention="linear", mask_self=True, n_isolated=2)),
    (4, 7, dict(attention="softmax", mask_self=False, n_isolated=1)),
    (3, 4, dict(attention="softmax", mask_self=True, tau=0.05)),
]
SLOW_CASES = [(n, cap, kw) for n in (2, 3, 6) for cap in (1, n + 1, 2 * n) for kw in model_grid()]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_dense_matrix_powers(case, rng):
    n, cap, kw = case
    model = gf.ModelSpec(max_len=cap, **kw)
    task = gf.ChainTask.uniform(n)
    for _ in range(2):
        theta = random_theta(rng)
        np.testing.assert_allclose(closed(theta, task, model), dense_capped(theta, n, model, cap), rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_matches_dense_matrix_powers_full_grid(case, rng):
    n, cap, kw = case
    model = gf.ModelSpec(max_len=cap, **kw)
    for _ in range(3):
        theta = random_theta(rng, 1.5)
        np.testing.assert_allclose(
            closed(theta, gf.ChainTask.uniform(n), model), dense_capped(theta, n, model, cap), rtol=0, atol=1e-10
        )


def test_scalars_weight_the_starts(rng):
    n, model = 5, gf.ModelSpec(mask_self=False, max_len=6)
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    theta = random_theta(rng)
    per = capped.per_start(theta, task, model)
    p = np.asarray(task.start_probs)
    for scalar, values in [
        (capped.expected_reward, per.success),
        (capped.reach_probability, per.reach),
        (capped.expected_length, per.length),
        (capped.traversal_probability, per.traversal),
        (capped.expected_loss, per.failure),
    ]:
        np.testing.assert_allclose(scalar(theta, task, model), p @ np.asarray(values), rtol=1e-13)
    np.testing.assert_allclose(capped.success_per_start(theta, task, model), per.success, rtol=1e-14)
    # gradflow.objective's public functions delegate to gradflow.capped for a capped model
    np.testing.assert_allclose(gf.expected_reward(theta, task, model), p @ np.asarray(per.success), rtol=1e-13)
    np.testing.assert_allclose(gf.length_per_start(theta, task, model), per.length, rtol=1e-13)
    # the keyword cap wins over the model's
    np.testing.assert_allclose(
        capped.success_per_start(theta, task, gf.ModelSpec(mask_self=False), max_len=6), per.success, rtol=1e-14
    )


def test_objective_loss_keeps_its_digits_with_a_cap():
    """Issue 23: with a cap, gf.expected_loss is gradflow.capped.expected_loss (a sum of positive terms),
    not 1 - J, which rounds to 0 where J rounds to 1."""
    model, task, theta = gf.ModelSpec(max_len=6), gf.ChainTask.uniform(4), gf.Theta(8.0, 0.0, 0.0)
    assert float(gf.expected_reward(theta, task, model)) == 1.0
    loss = gf.expected_loss(theta, task, model)
    assert 0.0 < float(loss) < 1e-15
    np.testing.assert_allclose(loss, capped.expected_loss(theta, task, model), rtol=1e-14)


def test_probabilities_are_consistent(rng):
    """0 <= success <= reach <= 1, 1 <= E[min(L, T)] <= T, traversal 0 beyond the cap (success is not:
    a far jump can land on a_n directly)."""
    n, cap = 6, 4
    model = gf.ModelSpec(mask_self=False, max_len=cap)
    for _ in range(3):
        success, reach, length, traversal = closed(random_theta(rng, 2.0), gf.ChainTask.uniform(n), model)
        assert np.all(success >= 0) and np.all(success <= reach + 1e-15) and np.all(reach <= 1 + 1e-15)
        assert np.all(length <= cap + 1e-12) and np.all(length >= 1 - 1e-12)
        np.testing.assert_array_equal(traversal[cap:], 0.0)  # d > cap: the exact path does not fit
        assert np.all(success[cap:] > 0)  # d > cap still succeeds by a far jump to a_n
        assert np.all(traversal <= success + 1e-15)


def check_large_cap(kw, cap=300):
    n, theta = 4, gf.Theta(1.0, -0.3, -0.4)
    task = gf.ChainTask.uniform(n)
    base = gf.ModelSpec(**kw)
    success, reach, length, traversal = closed(theta, task, gf.ModelSpec(max_len=cap, **kw))
    np.testing.assert_allclose(success, gf.same_side_probability(theta, task, base), atol=1e-10)
    np.testing.assert_allclose(reach, 1.0, atol=1e-10)
    np.testing.assert_allclose(length, gf.length_per_start(theta, task, base), atol=1e-9)
    np.testing.assert_allclose(traversal, gf.traversal_per_start(theta, task, base), atol=1e-12)


def test_large_cap_gives_the_uncapped_closed_form():
    check_large_cap(dict(mask_self=False))


@pytest.mark.slow
def test_large_cap_gives_the_uncapped_closed_form_softmax():
    check_large_cap(dict(attention="softmax", n_isolated=2))
    check_large_cap(dict(attention="softmax", mask_self=False, tau=0.1))


def test_extreme_scores_stay_finite():
    """|theta| / tau in the thousands: row weights are normalised by the row's largest logit."""
    n, task = 5, gf.ChainTask.uniform(5)
    model = gf.ModelSpec(mask_self=False, max_len=6, n_isolated=1)
    value_and_grad = jax.jit(jax.value_and_grad(lambda v: capped.expected_reward(gf.Theta.from_array(v), task, model)))
    for x in ([300.0, -200.0, 100.0, 0.0, 0.0], [-300.0, 200.0, 250.0, 0.0, 0.0], [300.0, -200.0, -150.0, 0.0, 0.0]):
        value, grad = value_and_grad(jnp.asarray(x))
        assert np.isfinite(value) and np.all(np.isfinite(grad))
    # succ 400 beats self 300 at the head, 100 inside: the walk goes straight forward
    forward = closed(gf.Theta(300.0, -200.0, 100.0), task, model)
    np.testing.assert_allclose(forward[0], 1.0, atol=1e-12)
    np.testing.assert_allclose(forward[2], np.arange(1, n), atol=1e-12)
    # gamma = -150: the head prefers its self-loop (300 > 150) and never leaves
    stuck = closed(gf.Theta(300.0, -200.0, -150.0), task, model)
    np.testing.assert_allclose(stuck[:, -1], [0.0, 0.0, 6.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("ratio", [300.0, 1e3, 1e4])
def test_finite_at_every_logit_scale_against_dense_powers(ratio, rng):
    """Issue 23 item 2 for the capped closed form: |theta|/tau = 300, 1e3, 1e4, both attentions, self-loops masked
    or kept, isolated vertices: the per-start read-outs equal the dense matrix powers and value and gradient are
    finite (each row is normalised by its largest logit, so float64 holds the capped form without a fallback)."""
    for attention in ATTENTIONS:
        for mask in (True, False):
            n, cap = int(rng.integers(3, 7)), int(rng.integers(1, 12))
            model = gf.ModelSpec(attention=attention, mask_self=mask, n_isolated=int(rng.integers(0, 2)), max_len=cap, tau=0.2)
            theta = gf.Theta.from_array(rng.normal(size=5) * ratio * 0.2 / np.sqrt(5))
            task = gf.ChainTask.uniform(n)
            np.testing.assert_allclose(closed(theta, task, model), dense_capped(theta, n, model, cap), atol=1e-9)
            reward = lambda x: capped.expected_reward(gf.Theta.from_array(x), task, model)
            value, grad = jax.value_and_grad(reward)(theta.as_array())
            assert np.isfinite(value) and np.all(np.isfinite(grad)), (attention, mask, n, cap, theta)


# --------------------------------------------------------------------------------------------------
# Derivatives
# --------------------------------------------------------------------------------------------------


H = 1e-5


def shifted(x, h=H):
    """x + h e_k and x - h e_k for the five unit vectors, stacked (10, 5)."""
    eye = h * jnp.eye(x.size)
    return jnp.concatenate([x + eye, x - eye])


def central_difference(values, h=H):
    """Central differences from the values at ``shifted`` points (leading axis 10)."""
    return (values[:5] - values[5:]) / (2 * h)


@pytest.mark.parametrize(
    "kw",
    [
        dict(mask_self=False),
        pytest.param(dict(attention="softmax", n_isolated=1), marks=pytest.mark.slow),
    ],
    ids=["linear", "softmax"],
)
def test_gradient_matches_finite_differences(kw, rng):
    n, task = 5, gf.ChainTask(5, [0.1, 0.2, 0.3, 0.4])
    model = gf.ModelSpec(max_len=n + 1, **kw)
    f = lambda v: capped.expected_reward(gf.Theta.from_array(v), task, model)

    @jax.jit
    def derivatives(x):  # one compilation: reverse, forward and the shifted values
        return jax.grad(f)(x), jax.jacfwd(f)(x), jax.vmap(f)(shifted(x))

    x = jnp.asarray(rng.normal(0.0, 0.5, size=5))
    grad, forward, values = derivatives(x)
    np.testing.assert_allclose(grad, central_difference(values), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(forward, grad, rtol=1e-12, atol=1e-14)
    if model.attention == "linear":
        np.testing.assert_array_equal(grad[3:], 0.0)


def test_hessian_in_both_modes(rng):
    """jax.hessian (forward over reverse) against reverse over reverse and differences of the gradient."""
    task = gf.ChainTask.uniform(4)
    model = gf.ModelSpec(mask_self=False, max_len=5)
    f = lambda v: capped.expected_reward(gf.Theta.from_array(v), task, model)

    @jax.jit
    def derivatives(x):
        return jax.hessian(f)(x), jax.jacrev(jax.grad(f))(x), jax.vmap(jax.grad(f))(shifted(x))

    x = jnp.asarray(rng.normal(0.0, 0.5, size=5))
    hess, rev_rev, grads = (np.asarray(a) for a in derivatives(x))
    np.testing.assert_allclose(hess, rev_rev, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hess, hess.T, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hess, central_difference(grads), rtol=1e-5, atol=1e-8)


def test_theta_zero_gradient_teaches_reaching_not_choosing():
    """At theta = 0 (uniform policy, self-loops kept) P(own) = P(other) for every start, and for
    d >= 2 the gradient of P(own) - P(other) vanishes: the capped gradient there only raises the
    probability of reaching *a* terminal (by lowering gamma, alpha and beta), it cannot tell which."""
    n = 6
    model, task = gf.ModelSpec(mask_self=False, max_len=n + 1), gf.ChainTask.uniform(n)
    per = lambda v: capped.per_start(gf.Theta.from_array(v), task, model)
    x0 = jnp.zeros(5)
    at0 = per(x0)
    np.testing.assert_allclose(2 * at0.success, at0.reach, rtol=1e-14)
    jac_success = np.asarray(jax.jacfwd(lambda v: per(v).success)(x0))
    jac_which = np.asarray(jax.jacfwd(lambda v: 2 * per(v).success - per(v).reach)(x0))
    np.testing.assert_allclose(jac_which[1:], 0.0, atol=1e-14)
    assert jac_which[0, 0] > 0.1 and jac_which[0, 2] < -0.1  # d = 1 alone tells which
    assert np.all(jac_success[1:, :3] < -0.05), jac_success  # d >= 2: every component pushes down


# --------------------------------------------------------------------------------------------------
# Token-level sampling
# --------------------------------------------------------------------------------------------------


def assert_close_in_se(samples, expected, label):
    samples = np.asarray(samples, dtype=float)
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    assert se > 0, f"{label}: no spread, the test does not test"
    z = (samples.mean() - expected) / se
    assert abs(z) < Z, f"{label}: {samples.mean():.5f} vs {expected:.5f} (z = {z:.2f})"


@pytest.mark.parametrize(
    "case",
    [
        (5, 6, dict(mask_self=False)),
        (4, 5, dict(attention="softmax", mask_self=False, n_isolated=2, tau=0.3)),
    ],
    ids=["linear", "softmax-iso"],
)
def test_rollouts_with_the_model_cap_match(case, rng):
    n, cap, kw = case
    model = gf.ModelSpec(max_len=cap, **kw)
    task = gf.ChainTask.uniform(n)
    theta = gf.Theta(rng.uniform(0.2, 0.8), *rng.normal(0.0, 0.3, size=4))
    A = sampling.full_attention(theta, 2 * n + model.n_isolated)
    ro = jax.device_get(sampling.rollouts(A, task, model, jax.random.key(7), BATCH))  # the model's cap
    assert ro.paths.shape[1] == cap and ro.lengths.max() <= cap
    assert 0.05 < ro.truncated.mean() < 0.95, "the cap must bind for the test to test"
    success, reach, length, traversal = closed(theta, task, model)
    for d in range(1, n):
        at = ro.distances == d
        assert at.sum() > 1000
        assert_close_in_se(ro.rewards[at], success[d - 1], f"success d={d}")
        assert_close_in_se(~ro.truncated[at], reach[d - 1], f"reach d={d}")
        assert_close_in_se(ro.lengths[at], length[d - 1], f"length d={d}")
        if traversal[d - 1] * at.sum() > 20:
            assert_close_in_se(ro.traversed[at], traversal[d - 1], f"traversal d={d}")


def test_rollout_cap_rule():
    """The max_len argument wins; else the model's cap; else 50 n."""
    task = gf.ChainTask.uniform(3)
    assert sampling.resolve_max_len(task, gf.ModelSpec()) == sampling.default_max_len(3)
    assert sampling.resolve_max_len(task, gf.ModelSpec(max_len=4)) == 4
    assert sampling.resolve_max_len(task, gf.ModelSpec(max_len=4), 9) == 9
    with pytest.raises(ValueError, match="max_len"):
        sampling.resolve_max_len(task, gf.ModelSpec(max_len=4), 0)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    task, theta = gf.ChainTask.uniform(3), gf.Theta(0.3, 0.0, 0.0)
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_len"):
            gf.ModelSpec(max_len=bad)
    with pytest.raises(ValueError, match="max_len"):
        capped.expected_reward(theta, task, gf.ModelSpec())
    with pytest.raises(ValueError, match="context"):
        capped.expected_reward(theta, task, gf.ModelSpec(context="history", max_len=3))
    assert gf.ModelSpec().max_len is None and gf.ModelSpec(max_len=3).max_len == 3
