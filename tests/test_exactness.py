"""Issue 12.1/12.2 and 13.1: the closed form against an mpmath reference at 50+ digits, and its
derivatives (any order, both modes) against finite differences.

Targets: J, P(own), P(other) and expected lengths to relative 1e-8 (the reference is the token-built
chain solved by GTH state reduction in mpmath, tests/reference.py); mask_self True/False give the
same reward to 1e-12; grad J to relative 1e-6 (linear attention) including the hardest-only plateau.
No NaN at any logit gap (issue 23.2: where float64 cannot hold a solve, an eager call falls back on the
host to ModelSpec(numbers="extended"), extended-exponent numbers, which traced code picks itself), tested
against the reference to |theta|/tau = 1e4; a length above 1e300 is inf.  The hypothesis runs marked slow
cover n 2..40, |theta| <= 200, tau 0.01..5; the default run draws a few small cases.
"""

import dataclasses

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from helpers import ATTENTIONS, model_id
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import dense_logits, mp_per_start, mp_reward_gradient

import gradflow as gf
from gradflow.objective import expected_loss, finite_or_extended

RTOL = 1e-8


def _check_against_reference(theta, task, model):
    """Relative 1e-8 on P(own), P(other) per start, lengths, J and 1 - J; NaN only as documented."""
    h = np.asarray(gf.same_side_probability(theta, task, model))
    length = np.asarray(gf.length_per_start(theta, task, model))
    reward, loss = float(gf.expected_reward(theta, task, model)), float(expected_loss(theta, task, model))
    assert np.all(np.isfinite(h)) and not np.any(np.isnan(length)), f"NaN at {theta}, {model}"
    assert 0.0 <= reward <= 1.0
    hs, qs, ls, _ = mp_per_start(theta, task, model)
    for d in range(task.n - 1):
        for got, want in ((h[d], hs[d]),):
            assert abs(got - want) <= RTOL * abs(want) + 1e-300, f"h[{d}] = {got} vs {want}"
        if np.isfinite(length[d]):
            assert abs(length[d] - ls[d]) <= RTOL * ls[d], f"L[{d}] = {length[d]} vs {ls[d]}"
        else:
            assert ls[d] > 1e300, f"L[{d}] = inf but the reference is {ls[d]}"
    p = [mp.mpf(float(x)) for x in np.asarray(task.start_probs)]
    want_j, want_loss = mp.fsum(a * b for a, b in zip(p, hs)), mp.fsum(a * b for a, b in zip(p, qs))
    assert abs(reward - want_j) <= RTOL * want_j + 1e-300, f"J = {reward} vs {want_j}"
    assert abs(loss - want_loss) <= RTOL * want_loss + 1e-300, f"1 - J = {loss} vs {want_loss}"
    return True


HARD_CASES = [  # (theta, n, model): the issue's failures and both far/local extremes
    (gf.Theta(2.0, 0.0, -2.0), 8, gf.ModelSpec(tau=0.05, mask_self=False)),
    (gf.Theta(1.0, 1.0, -4.0), 3, gf.ModelSpec(tau=0.1, mask_self=False)),
    (gf.Theta(0.0, 0.0, 4.0), 8, gf.ModelSpec(tau=0.1)),
    (gf.Theta(0.0, 15.0, 0.0, 1.0, -2.0), 5, gf.ModelSpec("softmax", tau=0.05)),
    pytest.param(gf.Theta(8.0, 0.0, -3.0), 10, gf.ModelSpec(tau=0.2, n_isolated=2), marks=pytest.mark.slow),  # 1-J ~ 1e-27
    pytest.param(gf.Theta(2.0, 0.5, -1.0), 6, gf.ModelSpec(tau=0.01), marks=pytest.mark.slow),  # |theta|/tau = 200
    pytest.param(
        gf.Theta(-1.0, 2.0, 0.5), 5, gf.ModelSpec(tau=0.3, mask_self=False, n_isolated=3), marks=pytest.mark.slow
    ),  # negative couplings
    pytest.param(
        gf.Theta(3.0, -1.0, 0.5, 0.7, 0.2),
        4,
        gf.ModelSpec("softmax", tau=0.02, mask_self=False, n_isolated=1),
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("theta, n, model", HARD_CASES, ids=lambda x: str(getattr(x, "n", x))[:20])
def test_hard_cases_match_the_mpmath_reference(theta, n, model):
    task = gf.ChainTask(n, np.random.default_rng(n).dirichlet(np.ones(n - 1)))
    assert _check_against_reference(theta, task, model), "unexpected NaN in a representable case"


def test_mask_self_never_changes_the_reward():
    task = gf.ChainTask.uniform(8)
    for theta in (gf.Theta(2, 0, -2), gf.Theta(-3, 0.5, 1.0)):
        for attention, tau in (("linear", 0.05), ("softmax", 0.05)):
            masked = float(gf.expected_reward(theta, task, gf.ModelSpec(attention, tau=tau)))
            free = float(gf.expected_reward(theta, task, gf.ModelSpec(attention, tau=tau, mask_self=False)))
            assert abs(masked - free) <= 1e-12 * masked


# mpmath reference of grad J at the hardest-only plateau, n = 20, theta = (0.3, 0, 0), tau = 0.2
# (tests/reference.py: mp_reward_gradient, 4th-order differences at 120+ digits; 45 s to recompute)
PLATEAU_N20 = np.array([8.246827600564375e-20, -1.3958786831353877e-21, -7.803763917850806e-20])


def test_hardest_only_plateau_gradient_keeps_its_digits():
    task, model = gf.ChainTask.hardest(20), gf.ModelSpec()
    grad = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))(jnp.array([0.3, 0, 0, 0, 0.0]))
    np.testing.assert_allclose(grad[:3], PLATEAU_N20, rtol=1e-8)
    assert grad[3] == 0.0 and grad[4] == 0.0


def test_plateau_gradient_against_mpmath_differences():
    task, model = gf.ChainTask.hardest(9), gf.ModelSpec(tau=0.25)
    x = np.array([0.3, -0.1, 0.05, 0.0, 0.0])
    grad = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))(jnp.asarray(x))
    np.testing.assert_allclose(grad[:3], mp_reward_gradient(x, task, model), rtol=1e-6)


def test_softmax_gradient_is_finite_at_large_scores():
    task, model = gf.ChainTask.uniform(5), gf.ModelSpec("softmax", tau=0.05)
    grad = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))(jnp.array([0.0, 15.0, 0, 0, 0]))
    assert np.all(np.isfinite(grad))


def test_unrepresentable_lengths_are_inf_and_extreme_rows_are_finite():
    """A length above 1e300 is inf; an elimination far beyond float64's range stays finite (issue 23.2)."""
    task = gf.ChainTask.uniform(4)
    # a_1 <-> a_2 ping-pong: each escape has probability ~ e^{-1250}
    length = gf.length_per_start(gf.Theta(5.0, 10.0, -10.0), task, gf.ModelSpec(tau=0.004))
    np.testing.assert_array_equal(length, [2.0, np.inf, np.inf])  # the mpmath reference: 2 and two lengths above 1e308
    extreme = float(gf.expected_reward(gf.Theta(10.0, 20.0, -10.0), task, gf.ModelSpec(tau=0.01)))
    assert 0.0 <= extreme <= 1.0


# issue 23.2: |theta|/tau = 300, 1e3, 1e4 (logit gaps of up to 4e4: reduced rows e^{-10^4} of their scale)
SLOW = pytest.mark.slow
EXTREME_CASES = [
    (gf.Theta(46.2, 46.2, -46.2), 8, gf.ModelSpec(tau=0.2, mask_self=False)),  # the issue's NaN: J = 0.72789
    pytest.param(gf.Theta(35.6, 0.0, -35.6), 3, gf.ModelSpec(tau=0.2, mask_self=False), marks=SLOW),  # the issue's NaN gradient
    pytest.param(gf.Theta(3.0, 2.0, -1.0), 6, gf.ModelSpec(tau=0.01), marks=SLOW),  # 300
    pytest.param(gf.Theta(3.0, 2.0, -1.0), 6, gf.ModelSpec(tau=0.003, mask_self=False), marks=SLOW),  # 1e3
    pytest.param(gf.Theta(3.0, 2.0, -1.0), 6, gf.ModelSpec(tau=0.0003, mask_self=False), marks=SLOW),  # 1e4
    pytest.param(gf.Theta(-1.0, 2.0, 3.0), 5, gf.ModelSpec(tau=0.0003, n_isolated=2), marks=SLOW),  # 1e4, far weights dominate
    pytest.param(gf.Theta(1.0, -2.0, 3.0), 5, gf.ModelSpec(tau=0.001, mask_self=False, n_isolated=1), marks=SLOW),
    pytest.param(gf.Theta(0.0, 800.0, 0.0, 1.0, -2.0), 4, gf.ModelSpec("softmax", tau=0.05), marks=SLOW),  # softmax, beta >= 740
    pytest.param(gf.Theta(3.0, -2.0, 1.0, 2.0, 0.5), 4, gf.ModelSpec("softmax", tau=0.0003, mask_self=False), marks=SLOW),  # 1e4
    pytest.param(gf.Theta(3.0, 2.0, -1.0), 30, gf.ModelSpec(tau=0.001), marks=SLOW),  # 3e3, scan path
    pytest.param(gf.Theta(-2.0, 3.0, 1.0), 12, gf.ModelSpec(tau=0.0003, mask_self=False), marks=SLOW),  # 1e4
    pytest.param(gf.Theta(1.0, 3.0, -2.0, 0.5, 1.0), 6, gf.ModelSpec("softmax", tau=0.001), marks=SLOW),  # 3e3
]


def _reward_and_grad(theta, task, model):
    """(J, grad J) eagerly: float64, or extended numbers where that has a NaN (``finite_or_extended``)."""
    f = lambda m: jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, m))(theta.as_array())
    return finite_or_extended(f, model)


@pytest.mark.parametrize("theta, n, model", EXTREME_CASES, ids=lambda x: str(getattr(x, "n", x))[:20])
def test_extreme_scales_match_the_mpmath_reference_with_finite_gradients(theta, n, model):
    task = gf.ChainTask.uniform(n)
    assert _check_against_reference(theta, task, model)
    masked = dataclasses.replace(model, mask_self=True)
    for m in (model, masked):
        value, grad = _reward_and_grad(theta, task, m)
        assert np.all(np.isfinite(grad)), f"{grad} at {m}"
        extended = dataclasses.replace(m, numbers="extended")  # the static choice: the same under jit
        assert float(jax.jit(gf.expected_reward)(theta, task, extended)) == pytest.approx(float(value), rel=1e-12)
    unmasked = gf.expected_reward(theta, task, dataclasses.replace(model, mask_self=False))
    assert abs(unmasked - gf.expected_reward(theta, task, masked)) <= 1e-12 * unmasked


def test_issue_case_self_loops_give_the_masked_reward_and_gradient():
    """Masked, the float64 solve holds it (its gradient was wrong: the JVP's x_k - x_{k+1} kept no digit where
    a row is held by its coupling); with self-loops the fallback runs: the same J and gradient."""
    task, theta = gf.ChainTask.uniform(8), gf.Theta(46.2, 46.2, -46.2)
    grads = [_reward_and_grad(theta, task, gf.ModelSpec(tau=0.2, mask_self=m)) for m in (True, False)]
    assert float(grads[0][0]) == pytest.approx(0.7278911564625851, rel=1e-12)  # the mpmath reference
    assert float(grads[1][0]) == pytest.approx(float(grads[0][0]), rel=1e-12)
    want = [0.93942339, -0.87463557, 0.06478782]  # mp_reward_gradient (tests/reference.py), 25 s to recompute
    for _, grad in grads:
        np.testing.assert_allclose(grad[:3], want, rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_extreme_gradients_second_derivatives_and_lengths_are_finite(attention):
    task = gf.ChainTask.uniform(4)
    model = gf.ModelSpec(attention, tau=0.001, mask_self=False, numbers="extended")  # traced: the model picks them
    x = jnp.array([3.0, 2.0, -1.0, 1.0, 0.0])
    f = lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model)
    derivatives = [jax.hessian(f)(x), jax.jacfwd(f)(x)]
    if attention == "linear":  # softmax: lengths ~1e107 here are finite, their gradient not yet (README limits)
        derivatives.append(jax.grad(lambda v: gf.expected_length(gf.Theta.from_array(v), task, model))(x))
    for value in derivatives:
        assert np.all(np.isfinite(value))


@pytest.mark.slow
def test_random_linear_configs_beyond_500_are_finite_and_masking_agrees():
    """The issue's random linear configs beyond |theta|/tau = 500 (NaN for 9 of 1,248 before): finite rewards and
    gradients, self-loops allowed and masked agreeing to 1e-12."""
    rng = np.random.default_rng(23)
    for _ in range(6):
        theta, n = gf.Theta(*rng.uniform(-3.0, 3.0, 3)), int(rng.integers(3, 9))
        tau = float(np.max(np.abs(theta.as_array()))) / rng.uniform(500.0, 1e4)
        task = gf.ChainTask.uniform(n)
        values = [_reward_and_grad(theta, task, gf.ModelSpec(tau=tau, mask_self=m)) for m in (True, False)]
        for value, grad in values:
            assert np.isfinite(value) and np.all(np.isfinite(grad)), f"{theta}, n = {n}, tau = {tau}"
        assert abs(values[0][0] - values[1][0]) <= 1e-12 * values[0][0]


def test_traced_code_keeps_float64_and_extended_is_a_static_choice():
    """Under vmap (a trace) float64 numbers give NaN for the member beyond float64 and keep the others bit for
    bit; ModelSpec(numbers="extended") gives every member, equal to float64's where that is finite."""
    task = gf.ChainTask.uniform(6)
    xs = jnp.array([[0.3, 0.1, -0.2, 0, 0], [3.0, 2.0, -1.0, 0, 0], [-0.5, 0.4, 0.2, 0, 0]])
    run = lambda model: jax.vmap(jax.value_and_grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model)))(xs)
    (values, grads), (ext_values, ext_grads) = (
        run(gf.ModelSpec(tau=0.01, mask_self=False)),
        run(gf.ModelSpec(tau=0.01, mask_self=False, numbers="extended")),
    )
    assert np.isnan(values[1]) and np.all(np.isnan(grads[1][:3]))  # never a wrong number nor a silent zero gradient
    assert np.all(np.isfinite(ext_values)) and np.all(np.isfinite(ext_grads))
    np.testing.assert_allclose(ext_values[::2], values[::2], rtol=1e-12)
    np.testing.assert_allclose(ext_grads[::2], grads[::2], rtol=1e-7, atol=1e-300)  # tiny components: to ~1e-16 of the norm


def test_the_float64_program_holds_no_extended_code():
    """numbers="float64" (the default) traces no cond and none of ``gradflow._extended``'s exponent arithmetic."""
    task, theta = gf.ChainTask.uniform(6), gf.Theta(0.3, 0.1, -0.2)

    def primitives(model):
        f = lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)
        text = str(jax.make_jaxpr(jax.value_and_grad(f))(theta.as_array()))
        return {name for name in ("cond", "bitcast_convert_type", "shift_left") if f" {name}[" in text or f"= {name}" in text}

    for attention in ATTENTIONS:
        assert primitives(gf.ModelSpec(attention)) == set()
        assert "bitcast_convert_type" in primitives(gf.ModelSpec(attention, numbers="extended"))


def test_numbers_is_checked_and_left_out_of_the_default_hash():
    with pytest.raises(ValueError, match="numbers"):
        gf.ModelSpec(numbers="float128")
    with pytest.raises(ValueError, match="numbers='extended' covers the uncapped closed form"):
        gf.ModelSpec(max_len=8, numbers="extended")
    config = gf.FlowParams(gf.ChainTask.uniform(4))
    assert "numbers" not in gf.sweep.canonical_json(config)
    assert gf.sweep.config_hash(config) != gf.sweep.config_hash(config.replace(model=gf.ModelSpec(numbers="extended")))


def test_two_vertex_gradient_is_relative_accurate_in_alpha():
    """n = 2, theta = (-2, 0, 0), tau = 1/16 (a hypothesis failure): J = (1 + x)/(3 + x), x = e^{-32}, and
    dJ/dalpha = 32 x/(3 + x)^2, tiny against J; expm1's own derivative (1 + expm1(-32)) kept it to 5e-4."""
    task, model = gf.ChainTask.uniform(2), gf.ModelSpec(tau=1 / 16)
    grad = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))(jnp.array([-2.0, 0, 0, 0, 0]))
    x = np.exp(-32.0)
    np.testing.assert_allclose(grad[0], 32 * x / (3 + x) ** 2, rtol=1e-12)


thetas = st.tuples(*[st.floats(-3.0, 3.0)] * 5)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=thetas,
    n=st.integers(2, 5),
    tau=st.sampled_from([0.05, 0.3, 2.0]),
    mask=st.booleans(),
    iso=st.integers(0, 2),
    attention=st.sampled_from(ATTENTIONS),
    seed=st.integers(0, 99),
)
@pytest.mark.slow
def test_property_small(x, n, tau, mask, iso, attention, seed):
    model = gf.ModelSpec(attention, tau=tau, mask_self=mask, n_isolated=iso)
    task = gf.ChainTask(n, np.random.default_rng(seed).dirichlet(np.ones(n - 1)))
    _check_against_reference(gf.Theta(*x), task, model)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=st.tuples(*[st.floats(-200.0, 200.0)] * 5),
    n=st.integers(2, 40),
    tau=st.floats(0.01, 5.0),
    mask=st.booleans(),
    iso=st.integers(0, 3),
    attention=st.sampled_from(ATTENTIONS),
    seed=st.integers(0, 99),
)
def test_property_wide(x, n, tau, mask, iso, attention, seed):
    if attention == "softmax":
        n = min(n, 10)  # the softmax reference solves one chain per start
    model = gf.ModelSpec(attention, tau=tau, mask_self=mask, n_isolated=iso)
    task = gf.ChainTask(n, np.random.default_rng(seed).dirichlet(np.ones(n - 1)))
    _check_against_reference(gf.Theta(*x), task, model)


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.tuples(*[st.floats(-2.0, 2.0)] * 3), n=st.integers(2, 14), tau=st.floats(0.05, 2.0))
@example(x=(-2.0, 0.0, 0.0), n=2, tau=1 / 16)  # a cancellation (docstring)
def test_property_linear_gradient(x, n, tau):
    """dJ/d(alpha, beta, gamma) equals mpmath to 1e-6 relative, or to 16 ulp of the component's chain-rule terms.

    A component can be a cancellation: at x = (-2, 0, 0), n = 2, tau = 1/16, dJ/dgamma = -4.503e-14 is the sum of
    terms of total size 10.7 (gamma moves a_1's far logits together; each probability's derivative P (1 - 2P)/tau
    cancels to P_succ ~ e^-32), so float64 holds it to about eps * 10.7 (-4.574e-14 from the closed form, 0.3 ulp of
    the terms).  Term sizes: sum |dJ/dL_uv dL_uv/dtheta_k| over the dense chain's logits L (``gradient_term_sizes``);
    16 ulp covers a few roundings per term (measured: at most 7); a wrong term or digit beyond that still fails."""
    task, model = gf.ChainTask.uniform(n), gf.ModelSpec(tau=tau)
    theta = np.array(list(x) + [0.0, 0.0])
    grad = np.asarray(jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))(jnp.asarray(theta)))
    if np.any(np.isnan(grad)):
        return
    want, terms = mp_reward_gradient(theta, task, model), gradient_term_sizes(x, task, model)
    for got, ref, size in zip(grad[:3], want, terms):
        assert abs(got - ref) <= 1e-6 * abs(ref) + 16 * np.finfo(float).eps * size, f"{got} vs {ref} (terms {size})"


def gradient_term_sizes(x, task: gf.ChainTask, model: gf.ModelSpec) -> np.ndarray:
    """sum_{u,v} |dJ/dL_uv dL_uv/dtheta_k| for theta_k = alpha, beta, gamma (linear attention, the fixed V): the size
    of the chain-rule terms of each gradient component, from the dense token chain in float64 (their size only)."""
    n = task.n
    x10 = jnp.array([*x, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # the fixed V: sigma = rho = 1, the rest 0
    transient = np.array([v for v in range(2 * n + model.n_isolated) if v not in (n - 1, 2 * n - 1)])
    starts = np.array([n - d - 1 for d in range(1, n)])  # a_{n-d}: index n-d-1 among the transient vertices

    def reward(logits):
        p = jax.nn.softmax(logits, axis=1)
        h = jnp.linalg.solve(jnp.eye(transient.size) - p[np.ix_(transient, transient)], p[transient, n - 1])
        return jnp.sum(task.start_probs * h[starts])

    logits = dense_logits(x10, n, model, 1)
    present = jnp.isfinite(logits)
    dj = jnp.where(present, jax.grad(reward)(jnp.where(present, logits, -1e300)), 0.0)
    dl = jax.jacfwd(lambda y: dense_logits(y, n, model, 1))(x10)[..., :3]
    return np.asarray(jnp.sum(jnp.abs(dj[..., None] * dl), axis=(0, 1)))


# -------------------------------------------------------------------------------------------------
# 13.1: every derivative, both modes, any order
# -------------------------------------------------------------------------------------------------

DERIV_MODELS = [
    gf.ModelSpec(),
    gf.ModelSpec(mask_self=False, n_isolated=1),
    gf.ModelSpec("softmax", tau=0.3),
    gf.ModelSpec("softmax", tau=0.3, mask_self=False),
]
QUANTITIES = {
    "reward": gf.expected_reward,
    "same_side": lambda t, k, m: gf.same_side_probability(t, k, m)[-1],
    "length": gf.expected_length,
}


DEFAULT_DERIV = {("reward", 0)}  # the rest: slow (compiles dominate)


@pytest.mark.parametrize(
    "model_index, name",
    [
        pytest.param(
            i, name, marks=() if (name, i) in DEFAULT_DERIV else pytest.mark.slow, id=f"{name}-{model_id(DERIV_MODELS[i])}"
        )
        for i in range(len(DERIV_MODELS))
        for name in QUANTITIES
    ],
)
def test_hessian_jvp_jacfwd_match_finite_differences(model_index, name):
    model, task = DERIV_MODELS[model_index], gf.ChainTask(4, [0.2, 0.3, 0.5])
    f = jax.jit(lambda x: QUANTITIES[name](gf.Theta.from_array(x), task, model))
    x = jnp.array([0.4, -0.2, 0.1, 0.3, -0.1])
    direction = jnp.array([0.3, -1.0, 0.5, 0.2, 0.7])
    # every mode in one program (one compilation); the finite differences of the gradient below call it again
    modes = jax.jit(lambda y: (jax.grad(f)(y), jax.jacfwd(f)(y), jax.jvp(f, (y,), (direction,))[1], jax.hessian(f)(y)))
    grad_fn = lambda y: modes(y)[0]
    grad, forward, tangent, hess = modes(x)
    eps = 1e-5
    fd = np.array([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in np.eye(5)])
    scale = np.max(np.abs(fd))
    np.testing.assert_allclose(forward, grad, atol=1e-12 * scale)
    assert abs(tangent - grad @ direction) <= 1e-12 * scale * 3
    assert np.max(np.abs(grad - fd)) <= 1e-6 * scale + 1e-10  # central differences: ~1e-11 round-off
    hfd = np.array([(grad_fn(x + 1e-4 * e) - grad_fn(x - 1e-4 * e)) / 2e-4 for e in np.eye(5)])
    np.testing.assert_allclose(hess, hfd, atol=1e-6 * max(np.max(np.abs(hfd)), 1e-12))
    np.testing.assert_allclose(hess, hess.T, atol=1e-12 * max(np.max(np.abs(hess)), 1e-300))


def test_issue_case_masked_gradient_matches_the_reference():
    """Masked, n = 8, theta = (46.2, 46.2, -46.2), tau = 0.2: float64 holds the solve; the gradient was wrong
    (0.8746, -0.8098, 0) where a row is held by its coupling (the scan JVP's x_k - x_{k+1} kept no digit)."""
    task, model = gf.ChainTask.uniform(8), gf.ModelSpec(tau=0.2)
    value, grad = jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))(
        jnp.array([46.2, 46.2, -46.2, 0.0, 0.0])
    )
    assert float(value) == pytest.approx(0.7278911564625851, rel=1e-12)  # the mpmath reference
    np.testing.assert_allclose(grad[:3], [0.93942339, -0.87463557, 0.06478782], rtol=1e-7)  # mp_reward_gradient, 25 s


def test_softmax_scores_without_a_context_token_are_zero():
    """A large beta gave exp(huge) x 0 = NaN for a vertex with no context token (|beta| >= 740 at any tau)."""
    task, model = gf.ChainTask.uniform(4), gf.ModelSpec("softmax", tau=1.0)
    theta = jnp.array([0.0, 800.0, 0.0, 1.0, -2.0])
    value, grad = jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))(theta)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
