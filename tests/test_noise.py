"""Policy-gradient noise (gradflow.noise): the closed-form REINFORCE moments against a dense reference
(the second-moment recursions enumerated on the token-built transition matrix) and against token-level
sampling; the critical batch; the SGD diffusion against sampled SGD; the `noise` figure.

Default run: the exact checks on small chains, one cheap sampling z-test, a small SDE run and the
figure's --quick run.  ``-m slow``: every sampling z-test (3+ thetas, both attentions, masks, caps) and
the SDE-against-sampled-training validation.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from helpers import slow_case
from reference import dense_transition, mp_moments, mp_moments_settled, mp_reward_gradient

import gradflow as gf
from gradflow import noise
from gradflow._extended import Extended
from gradflow.cli import main as cli_main
from gradflow.model import Theta, transition_matrix

# --------------------------------------------------------------------------------------------------
# Dense reference: the recursions of docs/THEORY.md §8.2 on the full token-built chain
# --------------------------------------------------------------------------------------------------


def dense_moments(theta: Theta, task: gf.ChainTask, model: gf.ModelSpec):
    """(h, m, M, F) per start distance d, from the dense transition matrix of gradflow.model.

    psi(u, v) = d log P(u, v) / d theta by jax.jacfwd of the dense P (0 where P = 0).  Uncapped: dense
    solves of (I - Q) x = rhs over every non-terminal vertex (isolated ones included); capped: the
    recursions run model.max_len times from 0.  V trained: the token-built two-matrix chain
    (``reference.dense_transition``) in the ten numbers.
    """
    n = task.n
    n_vertices = 2 * n + model.n_isolated
    term_a, term_b = n - 1, 2 * n - 1
    transient = np.array([v for v in range(n_vertices) if v not in (term_a, term_b)])
    x = theta.as_array(model.values)
    size = x.size

    def chain(start):
        if model.values == "trained":
            p_of = lambda y: dense_transition(y, n, model, start)
        else:
            p_of = lambda y: transition_matrix(Theta.from_array(y), n, model, start=start)
        p = p_of(x)
        dp = jax.jacfwd(p_of)(x)
        psi = jnp.where(p[..., None] > 0, dp / jnp.where(p > 0, p, 1.0)[..., None], 0.0)
        pp = jnp.einsum("uvi,uvj->uvij", psi, psi)
        h_term = jnp.zeros(n_vertices).at[term_a].set(1.0)
        keep = jnp.zeros(n_vertices).at[transient].set(1.0)  # 1 on transient vertices

        def sweep(h, m, big_m, big_f):
            """One application of the recursions' right-hand sides (values at v -> new values at u)."""
            h_new = p @ h
            m_new = jnp.einsum("uv,uvi,v->ui", p, psi, h) + p @ m
            big_m_new = (
                jnp.einsum("uv,uvij,v->uij", p, pp, h)
                + jnp.einsum("uv,uvi,vj->uij", p, psi, m)
                + jnp.einsum("uv,vi,uvj->uij", p, m, psi)
                + jnp.einsum("uv,vij->uij", p, big_m)
            )
            big_f_new = jnp.einsum("uv,uvij->uij", p, pp) + jnp.einsum("uv,vij->uij", p, big_f)
            fix = lambda new, term: keep.reshape((-1,) + (1,) * (new.ndim - 1)) * new + term
            return fix(h_new, h_term), fix(m_new, 0.0), fix(big_m_new, 0.0), fix(big_f_new, 0.0)

        if model.max_len is not None:
            state = (
                jnp.zeros(n_vertices) + h_term,
                jnp.zeros((n_vertices, size)),
                jnp.zeros((n_vertices, size, size)),
                jnp.zeros((n_vertices, size, size)),
            )
            for _ in range(model.max_len):
                state = sweep(*state)
            return state
        q = p[np.ix_(transient, transient)]
        a = jnp.eye(transient.size) - q
        solve = lambda rhs: jnp.linalg.solve(a, rhs.reshape(transient.size, -1)).reshape(rhs.shape)
        embed = lambda xt, term=0.0: jnp.zeros((n_vertices,) + xt.shape[1:]).at[transient].set(xt) + term
        h = embed(solve(p[transient, term_a]), h_term)
        m = embed(solve(jnp.einsum("uv,uvi,v->ui", p, psi, h)[transient]))
        rhs_big = (
            jnp.einsum("uv,uvij,v->uij", p, pp, h)
            + jnp.einsum("uv,uvi,vj->uij", p, psi, m)
            + jnp.einsum("uv,vi,uvj->uij", p, m, psi)
        )
        big_m = embed(solve(rhs_big[transient]))
        big_f = embed(solve(jnp.einsum("uv,uvij->uij", p, pp)[transient]))
        return h, m, big_m, big_f

    chain = jax.jit(chain, static_argnums=0)  # one program per start: eagerly, each small op compiles on first use
    if model.attention == "linear" and model.values == "fixed":
        values = chain(None)
        return [v[: n - 1][::-1] for v in values]
    per_start = [chain(s) for s in range(1, n)]
    return [jnp.stack([values[k][s - 1] for s, values in zip(range(1, n), per_start)])[::-1] for k in range(4)]


def _close(a, b, rtol=1e-11, atol=1e-13):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.max(np.abs(b))))
    assert np.max(np.abs(a - b)) <= atol + rtol * scale, float(np.max(np.abs(a - b)))


THETA = Theta(0.3, -0.2, 0.1, 0.2, -0.1)
# (attention, mask_self, n_isolated, max_len): every factor takes both values in the default pair
DEFAULT_MODELS = [("linear", True, 0, None), ("softmax", False, 2, 6)]
SLOW_MODELS = [
    ("linear", False, 1, None),
    ("softmax", True, 0, None),
    ("linear", True, 0, 7),
    ("linear", False, 2, 5),
    ("softmax", False, 1, None),
    ("softmax", True, 1, 9),
]


def _model(attention, mask_self, n_isolated, max_len):
    return gf.ModelSpec(attention=attention, mask_self=mask_self, n_isolated=n_isolated, max_len=max_len)


@pytest.mark.parametrize("spec", [DEFAULT_MODELS[0], *(slow_case(s) for s in DEFAULT_MODELS[1:] + SLOW_MODELS)])
def test_moments_match_dense_reference(spec):
    """h, E[R S], E[R S S^T], E[S S^T] per start equal the dense enumeration to round-off."""
    task = gf.ChainTask.uniform(5)
    model = _model(*spec)
    closed = noise.moments_per_start(THETA, task, model)
    for ours, reference in zip(closed, dense_moments(THETA, task, model)):
        _close(ours, reference)
    if model.max_len is None:
        _close(closed.reward, gf.same_side_probability(THETA, task, model))


def _agree_with_reference(ours, reference, label: str, which=(0, 1, 2, 3), rtol: float = 1e-9):
    """The moments ``which`` equal the mpmath ones: h to ``rtol`` relative, the others to ``rtol`` of the moment's
    largest finite size (they are signed sums); beyond float64's range (the reference inf, e.g. F where rollouts are
    astronomically long) ours is the same inf."""
    for k in which:
        a, b = np.asarray(ours[k]), np.asarray(reference[k])
        if k == 0:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-300, err_msg=label)
            continue
        beyond = ~np.isfinite(b)
        assert np.all(a[beyond] == b[beyond]), label
        scale = max(1.0, float(np.max(np.abs(b[~beyond]), initial=0.0)))
        assert np.all(np.abs(a[~beyond] - b[~beyond]) <= rtol * scale), (label, k, float(np.max(np.abs(a[~beyond] - b[~beyond]))))


# (attention, mask_self, n_isolated, values): the default run takes the cheapest; each compiles its extended program
EXTREME_NOISE_MODELS = [("linear", True, 0, "fixed")] + [
    pytest.param(spec, marks=pytest.mark.slow)
    for spec in [
        ("linear", False, 1, "fixed"),
        ("softmax", True, 0, "fixed"),
        ("softmax", False, 1, "fixed"),
        ("linear", True, 0, "trained"),
        ("linear", False, 1, "trained"),
        ("softmax", False, 1, "trained"),
    ]
]


@pytest.mark.parametrize("spec", EXTREME_NOISE_MODELS)
def test_moments_finite_at_extreme_scales_against_mpmath(spec, rng):
    """Issue 23 item 2 for the noise moments: at |theta|/tau = 300, 1e3, 1e4 the eager moments (float64, then extended
    numbers where float64 gave a NaN) and ``ModelSpec(numbers="extended")`` hold no NaN; h equals the mpmath chain to
    1e-9, and with V fixed F = E[S S^T] too (to 1e-9 of its size), and so do the float64 program's values where
    finite.  M = E[R S S^T] and m need a reference of 300 digits and more there (the reference's recursion for m
    cancels by about 152 digits at 1e3): ``test_m_is_the_closed_forms_gradient_of_h_and_keeps_its_digits_at_extreme_scales``
    and ``test_second_moment_equals_the_reference_at_extreme_scales``; F with V trained is not checked (a V-trained
    M or F can still be wrong at 1e3)."""
    attention, mask_self, n_isolated, values = spec
    kwargs = dict(attention=attention, mask_self=mask_self, n_isolated=n_isolated, tau=0.2, values=values)
    model, extended = gf.ModelSpec(**kwargs), gf.ModelSpec(**kwargs, numbers="extended")
    task, size = gf.ChainTask.uniform(4), Theta.size(values)
    checked = (0, 3) if values == "fixed" else (0,)
    for ratio in (300.0, 1e3, 1e4):
        x = rng.normal(size=size) * ratio * 0.2 / np.sqrt(size)
        label = f"{spec} |theta|/tau = {ratio}: {x.tolist()}"
        reference = mp_moments(x, task, model, dps=150)
        eager = [np.asarray(a) for a in noise.moments_per_start(x, task, model)]
        assert not any(np.isnan(a).any() for a in eager), label
        _agree_with_reference(eager, reference, label, checked)
        _agree_with_reference([np.asarray(a) for a in noise.moments_per_start(x, task, extended)], reference, label, checked)
        float64 = [np.asarray(a) for a in noise._moments_per_start(jnp.asarray(x), task, model)]
        _agree_with_reference([np.where(np.isnan(a), b, a) for a, b in zip(float64, reference)], reference, label, checked)


def test_the_float64_moments_hold_no_extended_code():
    """The default float64 moments trace none of ``gradflow._extended``'s exponent arithmetic; the extended ones do."""
    task, x = gf.ChainTask.uniform(4), THETA.as_array()

    def bitcasts(model):
        return "bitcast_convert_type" in str(jax.make_jaxpr(lambda y: noise._moments_per_start(y, task, model))(x))

    assert not bitcasts(gf.ModelSpec()) and not bitcasts(gf.ModelSpec(attention="softmax"))
    assert bitcasts(gf.ModelSpec(numbers="extended"))


def test_m_is_the_closed_forms_gradient_of_h_and_keeps_its_digits_at_extreme_scales():
    """At |theta|/tau = 1e3 (linear, tau = 0.2, h = 1/2 at every start) the true m = grad h is 1e-93..1e-88 per
    component (the reference needs 300 digits: the recursion's signed parts, about 1e88, cancel by about 152), and
    the recursion's own m was 1e72 in float64 and extended numbers alike; m is now the closed form's gradient of h
    and equals the reference to 1e-8 relative, every component."""
    x = np.array([37.64602096998613, -16.05366991982297, 40.13102900705486, -7.991601937436284, 13.3840603743027])
    task, model = gf.ChainTask.uniform(4), gf.ModelSpec(tau=0.2)
    reference = mp_moments(x, task, model, dps=300)[1]
    assert np.all(np.abs(reference[:, :3]) < 1e-80) and np.all(reference[:, :3] != 0)
    for m in (model, gf.ModelSpec(tau=0.2, numbers="extended")):
        np.testing.assert_allclose(np.asarray(noise.moments_per_start(x, task, m).grad), reference, rtol=1e-8, atol=0)
    # the two mpmath routes agree: dJ/dtheta by central differences at the precision the derivative itself needs
    pooled = np.asarray(task.start_probs)[::-1] @ reference[:, :3]
    np.testing.assert_allclose(mp_reward_gradient(x, task, model), pooled, rtol=1e-8, atol=0)


# (attention, mask_self, n_isolated, |theta|/tau, seed, digits of the reference): M at 1e3 needs 300, at 1e4 2000
EXTREME_M_CASES = [
    ("linear", True, 0, 1e3, 1, 300),
    slow_case(("linear", False, 1, 1e4, 0, 2000)),
    slow_case(("softmax", True, 0, 1e3, 0, 300)),
]


@pytest.mark.parametrize("case", EXTREME_M_CASES)
def test_second_moment_equals_the_reference_at_extreme_scales(case):
    """Issue 23 item 2 for M = E[R S S^T] (V fixed): its right-hand side psi psi^T h + psi m^T + m psi^T takes m at every
    row from the closed form's gradient of h (the recursion's own m was 1e72 where m is 1e-93 at 1e3, and M wrong in
    its leading digit), and softmax attention's shares derive to relative accuracy (``gradflow.model.attention_shares``:
    the dominant token's derivative was 1 - 1); M equals the mpmath chain to 1e-12 of its largest entry per start,
    float64 and extended numbers, at |theta|/tau = 1e3 (M up to 3e65) and 1e4 (linear: up to 7e244)."""
    attention, mask_self, n_isolated, ratio, seed, dps = case
    kwargs = dict(attention=attention, mask_self=mask_self, n_isolated=n_isolated, tau=0.2)
    task = gf.ChainTask.uniform(4)
    x = np.random.default_rng(seed).normal(size=5) * ratio * 0.2 / np.sqrt(5)
    reference = mp_moments(x, task, gf.ModelSpec(**kwargs), dps=dps)[2]
    scale = np.max(np.abs(reference), axis=(1, 2), keepdims=True)
    assert np.all(np.isfinite(reference)) and np.all(scale > 0)
    for numbers in ("float64", "extended"):
        ours = np.asarray(noise.moments_per_start(x, task, gf.ModelSpec(**kwargs, numbers=numbers)).reward_second)
        assert np.all(np.abs(ours - reference) <= 1e-12 * scale), (case, numbers, float(np.max(np.abs(ours - reference) / scale)))


# V trained (attention, mask_self, n_isolated, |theta|/tau, seed, numbers): draws where M and F were wrong finite values
EXTREME_TRAINED_CASES = [
    ("softmax", False, 1, 1e3, 2, "float64"),
    slow_case(("softmax", False, 1, 1e3, 2, "extended")),
    *(slow_case(("softmax", False, 1, 300.0, 2, numbers)) for numbers in ("float64", "extended")),
    *(slow_case(("linear", True, 0, 300.0, 0, numbers)) for numbers in ("float64", "extended")),
]


@pytest.mark.parametrize("case", EXTREME_TRAINED_CASES)
def test_second_moments_with_v_trained_equal_the_reference_at_extreme_scales(case):
    """Issue 23 item 2 for M and F with V trained: c - cbar is measured from each row's heaviest term (a row held by its
    self-loop but for 1e-50 had Var_P(c) polluted by one ulp of cbar squared, and F was 9e17 for 175 at 1e3) and each
    far class's term meets its members' minus-class corrections before the other terms (the terminal class's h = 1
    swallowed M's 1e-163 right-hand side: M was 1e-127 for 2e-112).  M and F equal the 300-digit mpmath chain (the same
    at 600) to 1e-12 of their largest entry per start, float64 and extended numbers (extended: slow run)."""
    attention, mask_self, n_isolated, ratio, seed, numbers = case
    kwargs = dict(attention=attention, mask_self=mask_self, n_isolated=n_isolated, tau=0.2, values="trained")
    task = gf.ChainTask.uniform(4)
    x = np.random.default_rng(seed).normal(size=10) * ratio * 0.2 / np.sqrt(10)
    reference = mp_moments(x, task, gf.ModelSpec(**kwargs), dps=300)
    ours = noise.moments_per_start(x, task, gf.ModelSpec(**kwargs, numbers=numbers))
    for name, got, want in (("M", ours.reward_second, reference[2]), ("F", ours.score_second, reference[3])):
        scale = np.max(np.abs(want), axis=(1, 2), keepdims=True)
        assert np.all(np.isfinite(want)) and np.all(scale > 0)
        error = float(np.max(np.abs(np.asarray(got) - want) / scale))
        assert error <= 1e-12, (case, name, error)


# softmax attention (V fixed) near h = 1/2 at |theta|/tau = 1e3: (mask_self, n_isolated, seed, numbers)
NEAR_HALF_CASES = [
    (True, 0, 2, "float64"),
    slow_case((True, 0, 1, "float64")),
    *(slow_case((mask, n_isolated, seed, "extended")) for mask, n_isolated in ((True, 0), (False, 1)) for seed in (1, 2)),
]


@pytest.mark.parametrize("case", NEAR_HALF_CASES)
def test_m_near_one_half_keeps_its_digits_with_softmax_attention(case):
    """Issue 23: m = grad h was read from h (or 1 - q) where h is near 1/2, right only to 1e-16 ABSOLUTE: at 1e3 (seed 2,
    d = 2) m was 6.9e-41 where it is 1.2e-63, and at d = 3 (4e-126) and seed 1 (1e-45) wrong by up to 1e28.  e = h - 1/2
    is now solved for itself: the mirror-symmetric chain's deviation (linear attention's folded tridiagonal) plus the
    start row's correction times the expected visits to the start (``gradflow.objective.softmax_deviation``), read
    while |e| <= 1/4.  m equals the 300-digit mpmath chain (the same at 600: the reference has settled) to 1e-12
    relative, every component, and M to 1e-12 of its largest entry per start (M was right before and stays so)."""
    mask_self, n_isolated, seed, numbers = case
    kwargs = dict(attention="softmax", mask_self=mask_self, n_isolated=n_isolated, tau=0.2)
    task = gf.ChainTask.uniform(4)
    x = np.random.default_rng(seed).normal(size=5) * 1e3 * 0.2 / np.sqrt(5)
    reference = mp_moments(x, task, gf.ModelSpec(**kwargs), dps=300)
    if numbers == "extended":  # the slow run: the reference has settled (the default case's draw is among these)
        np.testing.assert_array_equal(mp_moments(x, task, gf.ModelSpec(**kwargs), dps=600)[1], reference[1])
    assert np.all(np.abs(reference[0][1:] - 0.5) < 1e-15) and np.all(reference[1] != 0)
    ours = noise.moments_per_start(x, task, gf.ModelSpec(**kwargs, numbers=numbers))
    np.testing.assert_allclose(np.asarray(ours.grad), reference[1], rtol=1e-12, atol=0)
    scale = np.max(np.abs(reference[2]), axis=(1, 2), keepdims=True)
    assert np.all(np.abs(np.asarray(ours.reward_second) - reference[2]) <= 1e-12 * scale)


@pytest.mark.parametrize("numbers", ["float64", slow_case("extended")])
def test_m_through_the_isolated_return_logit_keeps_its_digits(numbers):
    """Issue 23: softmax, self-loops allowed, one isolated vertex, |theta| / tau = 1e3 (seed 3, h = 0.97 .. 0.92, read
    from q): m's gamma and delta components were -1.0e-53 and +1.0e-53 where they are -6.7e-64 and 4.2e-100, the
    round-off of differentiating the solve through the isolated vertices' return logit (a difference of two class
    means near 1/2).  That derivative is now D (mean h over degree 1 - mean h over degree 2) df1 from e's symmetric
    part (``gradflow.objective._detour_split``): every component of m equals the 300-digit mpmath chain to 1e-12, in
    float64 and in extended numbers (there m was off by 2.5e46 relative: the extended solve kept the old route)."""
    kwargs = dict(attention="softmax", mask_self=False, n_isolated=1, tau=0.2)
    task = gf.ChainTask.uniform(4)
    x = np.random.default_rng(3).normal(size=5) * 1e3 * 0.2 / np.sqrt(5)
    reference = mp_moments(x, task, gf.ModelSpec(**kwargs), dps=300)
    assert np.all(reference[0] > 0.9) and np.all(reference[1] != 0)
    ours = noise.moments_per_start(x, task, gf.ModelSpec(**kwargs, numbers=numbers))
    np.testing.assert_allclose(np.asarray(ours.grad), reference[1], rtol=1e-12, atol=0)


# V trained near h = 1/2 or h = 1/4 (attention, mask_self, n_isolated, seed, rtol by start distance d)
NEAR_HALF_TRAINED_CASES = [
    ("softmax", True, 0, 1, {2: 1e-10, 3: 1e-12}),
    ("softmax", False, 1, 0, {1: 1e-8, 2: 1e-8, 3: 1e-12}),
    ("softmax", False, 0, 0, {3: 1e-12}),
    ("softmax", False, 2, 0, {3: 1e-12}),
    ("softmax", False, 1, 5, {1: 1e-12, 2: 1e-12, 3: 1e-12}),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", NEAR_HALF_TRAINED_CASES)
def test_m_with_v_trained_keeps_its_digits_near_one_half(case):
    """Issue 23 with V trained at 1e3: e = h - 1/2 by its mirror-symmetric part, e_sym + G r
    (``two_matrix.start_deviation``), and each row's scale carrying its heaviest logit's derivative
    (``two_matrix.start_system``).  m was wrong by 5.8 (seed 1, d = 2) and by 6.0 and 5e6 (seed 0 unmasked, d = 1 at
    h = 1/4 and d = 2); where the two chains' logits tie (seed 0, d = 3: the start row's two terminals, and the walk
    splits alike between the chains' far vertices) the solve with terminals (1/2, -1/2) took e = -4.1e-38 as the
    difference of its two chains' parts of 1e-17 and m was 0 in 7 of its 10 components (seeds 0 and 1 at d = 3, and
    seed 5, likewise).  It equals the 300-digit mpmath chain (the same at 600) to ``rtol`` (1e-8: the derivatives of the
    start's extra M d, 1e-53 .. 1e-60 at h = 1/4 and 1/2 + 1e-21, keep 9 digits)."""
    attention, mask_self, n_isolated, seed, rtols = case
    kwargs = dict(attention=attention, mask_self=mask_self, n_isolated=n_isolated, tau=0.2, values="trained")
    task = gf.ChainTask.uniform(4)
    x = np.random.default_rng(seed).normal(size=10) * 1e3 * 0.2 / np.sqrt(10)
    rows = np.array(list(rtols)) - 1
    reference = mp_moments(x, task, gf.ModelSpec(**kwargs), dps=300)[1][rows]
    np.testing.assert_array_equal(mp_moments(x, task, gf.ModelSpec(**kwargs), dps=600)[1][rows], reference)
    ours = np.asarray(noise.moments_per_start(x, task, gf.ModelSpec(**kwargs)).grad)[rows]
    for row, expected, rtol in zip(ours, reference, rtols.values()):
        np.testing.assert_allclose(row, expected, rtol=rtol, atol=0)


def _as_mpf(x) -> np.ndarray:
    """An ``Extended`` (or float) array as mpf numbers: m 2^e exactly, at any exponent."""
    if isinstance(x, Extended):
        exact = lambda m, e: mp.ldexp(mp.mpf(float(m)), int(e)) if m != 0 else mp.mpf(0)
        return np.vectorize(exact, otypes=[object])(np.asarray(x.m), np.asarray(x.e))
    return np.vectorize(lambda v: mp.mpf(float(v)), otypes=[object])(np.asarray(x))


# V trained where M and F leave float64's range (attention, mask_self, n_isolated, |theta|/tau, seed, tolerance)
BEYOND_FLOAT_TRAINED_CASES = [
    ("linear", True, 0, 1e3, 0, 1e-12),
    ("softmax", False, 1, 1e4, 0, 1e-11),
    ("softmax", False, 1, 1e4, 1, 1e-11),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", BEYOND_FLOAT_TRAINED_CASES)
def test_second_moments_with_v_trained_equal_the_reference_beyond_float64(case):
    """Issue 23 item 2: with V trained at |theta|/tau = 1e3 (linear: M 4e-1310, F 5e-668, every value of the chain far
    below float64) and 1e4 (softmax), M and F in extended numbers (``noise._chain_moments(as_float=False)``) equal the
    mpmath chain kept as mpf (``mp_moments(as_float=False)``: its floats were 0 or inf there) at the precision where it
    has settled (``mp_moments_settled``: 4800 digits for linear) to ``tolerance`` of their largest entry per start (1e4:
    float64's own rounding of logits of 5e3 is 1e-12 of them); the eager float64 moments are finite, and at 1e4 equal
    the reference's floats, m at d = 1 included to ``tolerance`` of its largest component (1.8e-123: it was 1e-258 before
    each row's scale carried its heaviest logit's derivative; components below 1e-200 are not yet right: a logit's
    derivative is summed from a class part and a correction, and the correction's 1e-211 drowns in the class's 1e-138)."""
    attention, mask_self, n_isolated, ratio, seed, tolerance = case
    kwargs = dict(attention=attention, mask_self=mask_self, n_isolated=n_isolated, tau=0.2, values="trained")
    task, n = gf.ChainTask.uniform(4), 4
    x = np.random.default_rng(seed).normal(size=10) * ratio * 0.2 / np.sqrt(10)
    reference, _ = mp_moments_settled(x, task, gf.ModelSpec(**kwargs), dps=300, which=(2, 3))
    extended = gf.ModelSpec(**kwargs, numbers="extended")
    at_start = jax.jit(lambda y, s: noise._chain_moments(y, n, extended, s, as_float=False))
    with mp.workdps(50):
        for d in range(1, n):
            start = n - d
            moments = at_start(jnp.asarray(x), start)
            for k, name in ((2, "M"), (3, "F")):
                ours, want = _as_mpf(jax.tree.map(lambda v: v[start - 1], moments[k])), reference[k][d - 1]
                scale = max(abs(v) for v in want.flat)
                error = max(abs(a - b) for a, b in zip(ours.flat, want.flat)) / scale
                assert scale > 0 and error <= tolerance, (case, name, d, mp.nstr(error, 3), mp.nstr(scale, 3))
    public = noise.moments_per_start(x, task, gf.ModelSpec(**kwargs))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in public)
    if ratio == 1e4:
        for k in (2, 3):
            want = np.vectorize(float)(reference[k]).astype(float)
            scale = np.max(np.abs(want), axis=(1, 2), keepdims=True)
            assert np.all(np.abs(np.asarray(public[k]) - want) <= tolerance * scale)
        want = np.vectorize(float)(reference[1][0]).astype(float)
        assert np.max(np.abs(np.asarray(public.grad)[0] - want)) <= tolerance * np.max(np.abs(want))


@pytest.mark.slow
def test_moments_fall_back_to_extended_numbers():
    """Where float64 leaves its range (|theta|/tau = 1e4) the eager moments, covariances and critical batch are the
    extended program's, with no NaN; under a trace no fallback is possible (the float64 NaN stays)."""
    task, model = gf.ChainTask.uniform(4), gf.ModelSpec(mask_self=False, n_isolated=1, tau=0.2)
    extended = gf.ModelSpec(mask_self=False, n_isolated=1, tau=0.2, numbers="extended")
    x = jnp.array([1000.0, -600.0, 400.0, 0.0, 0.0])
    assert np.isnan(np.asarray(jax.jit(lambda y: noise.moments_per_start(y, task, model).reward)(x))).any()
    for ours, theirs in zip(noise.moments_per_start(x, task, model), noise.moments_per_start(x, task, extended)):
        np.testing.assert_array_equal(ours, theirs)
    for fn in (noise.gradient_covariance, noise.critical_batch, lambda *a: noise.batch_covariance(*a, batch=8)):
        out = fn(x, task, model)
        assert not any(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree.leaves(out))
        for ours, theirs in zip(jax.tree.leaves(out), jax.tree.leaves(fn(x, task, extended))):
            np.testing.assert_array_equal(ours, theirs)


TRAINED_THETA = Theta(0.4, -0.3, 0.2, 0.5, -0.2, sigma=1.3, rho=0.6, omega=0.2, mu=-0.7, nu=0.3)
TRAINED_MODELS = [("linear", True, 0, None), ("softmax", False, 2, None), ("linear", False, 1, 6)]


@pytest.mark.parametrize("spec", [TRAINED_MODELS[0], *(slow_case(s) for s in TRAINED_MODELS[1:])])
def test_moments_with_v_trained_match_the_dense_token_chain(spec):
    """V trained (docs/THEORY.md §10): h, E[R S], E[R S S^T], E[S S^T] in the ten numbers equal the recursions
    on the token-built two-matrix chain, and the mean is grad J of ``gradflow.two_matrix`` / ``capped``."""
    task = gf.ChainTask.mixture(5, 0.3, (1, 3))
    attention, mask_self, n_isolated, max_len = spec
    model = gf.ModelSpec(
        attention=attention, mask_self=mask_self, n_isolated=n_isolated, max_len=max_len, values="trained", tau=0.5
    )
    closed = noise.moments_per_start(TRAINED_THETA, task, model)
    assert closed.grad.shape == (4, Theta.size("trained"))
    for ours, reference in zip(closed, dense_moments(TRAINED_THETA, task, model)):
        _close(ours, reference)
    x = TRAINED_THETA.as_array("trained")
    grad = jax.grad(lambda y: gf.expected_reward(Theta.from_array(y), task, model))(x)
    _close(noise.gradient_covariance(TRAINED_THETA, task, model).mean, grad)
    with pytest.raises(ValueError, match="size 10"):
        noise.moments_per_start(TRAINED_THETA.as_array(), task, model)


@pytest.mark.slow
def test_covariance_with_v_trained_matches_sampling():
    """V trained: every entry of the mean and covariance of (R - J) S in the ten numbers within 4 standard errors
    of 20k token-level rollouts (full A and V)."""
    theta = Theta(0.6, -0.2, 0.1, 0.3, -0.1, sigma=1.2, rho=0.8, omega=0.1, mu=-0.5, nu=0.2)
    model = gf.ModelSpec(tau=0.5, mask_self=False, values="trained")
    z_cov, z_mean, samples = _z_scores(theta, gf.ChainTask.uniform(4), model, 20_000, seed=3)
    assert samples.scores.shape == (20_000, 10)
    assert np.max(np.abs(z_cov)) < 4.0 and np.max(np.abs(z_mean)) < 4.0


@pytest.mark.parametrize("spec", DEFAULT_MODELS)
def test_mean_is_grad_j(spec):
    """The estimator's mean is grad J (jax.grad of gradflow.expected_reward), for both baselines."""
    task = gf.ChainTask.mixture(5, 0.3, (1, 2))
    model = _model(*spec)
    grad = jax.grad(lambda x: gf.expected_reward(Theta.from_array(x), task, model))(THETA.as_array())
    for baseline in ("mean", "none"):
        _close(noise.gradient_covariance(THETA, task, model, baseline).mean, grad)


def test_covariance_baselines_and_batch_identities():
    """Sigma_none - Sigma_mean = J (J F - 2 M) pooled; batch "mean" is Sigma / B; all symmetric PSD."""
    task = gf.ChainTask.uniform(5)
    model = gf.ModelSpec()
    mean_b = noise.gradient_covariance(THETA, task, model, "mean").covariance
    none_b = noise.gradient_covariance(THETA, task, model, "none").covariance
    mo = noise.moments_per_start(THETA, task, model)
    p = task.start_probs
    reward = p @ mo.reward
    big_m, big_f = (jnp.einsum("d,dij->ij", p, x) for x in (mo.reward_second, mo.score_second))
    _close(none_b - mean_b, -(reward * (reward * big_f - 2.0 * big_m)))
    _close(noise.batch_covariance(THETA, task, model, 7, "mean").covariance, mean_b / 7)
    for cov in (mean_b, none_b):
        _close(cov, cov.T)
        assert np.min(np.linalg.eigvalsh(np.asarray(cov))) > -1e-10
    # linear attention: eta and delta carry neither signal nor noise
    assert np.all(np.asarray(mean_b)[3:] == 0.0) and np.all(np.asarray(mean_b)[:, 3:] == 0.0)


# --------------------------------------------------------------------------------------------------
# Token-level sampling: every entry within 4 standard errors, with enough samples to have teeth
# --------------------------------------------------------------------------------------------------


def _z_scores(theta, task, model, batch, seed):
    """z of the sample mean and covariance of g = (R - J) S against the closed form (per entry)."""
    samples = noise.sample_scores(theta, task, model, jax.random.key(seed), batch)
    exact = noise.gradient_covariance(theta, task, model, "mean")
    reward = float(task.start_probs @ noise.moments_per_start(theta, task, model).reward)
    g = (np.asarray(samples.rewards) - reward)[:, None] * np.asarray(samples.scores)
    mean = g.mean(axis=0)
    se_mean = g.std(axis=0, ddof=1) / np.sqrt(batch)
    centred = g - mean
    products = centred[:, :, None] * centred[:, None, :]
    cov = products.mean(axis=0) * batch / (batch - 1)
    se_cov = products.std(axis=0, ddof=1) / np.sqrt(batch)
    exact_cov, exact_mean = np.asarray(exact.covariance), np.asarray(exact.mean)
    # entries that are exactly zero in the closed form (linear attention: eta, delta) are zero in samples
    zero = se_cov == 0
    assert np.all(np.abs(exact_cov[zero]) < 1e-14)
    z_cov = np.where(zero, 0.0, (cov - exact_cov) / np.where(zero, 1.0, se_cov))
    z_mean = np.where(se_mean == 0, 0.0, (mean - exact_mean) / np.where(se_mean == 0, 1.0, se_mean))
    # power: the standard error of every non-zero variance is below 5 % of it, and the test rejects the
    # covariance without the baseline (b = 0) somewhere
    diag = np.diag(exact_cov) > 0
    assert np.all(np.diag(se_cov)[diag] < 0.05 * np.diag(exact_cov)[diag])
    wrong = np.asarray(noise.gradient_covariance(theta, task, model, "none").covariance)
    assert np.max(np.abs(np.where(zero, 0.0, (cov - wrong) / np.where(zero, 1.0, se_cov)))) > 4.0
    return z_cov, z_mean, samples


def test_covariance_matches_sampling_cheap():
    """One theta, linear attention: 20k token-level rollouts; also the leave-one-out batch formula."""
    task, model = gf.ChainTask.uniform(5), gf.ModelSpec()
    theta = Theta(0.3, 0.0, 0.0)
    z_cov, z_mean, samples = _z_scores(theta, task, model, 20_000, seed=0)
    assert np.max(np.abs(z_cov)) < 4.0 and np.max(np.abs(z_mean)) < 4.0
    # leave-one-out batches of B = 4 (what sampled training steps on): covariance of the batch mean
    batch = 4
    rewards = np.asarray(samples.rewards).reshape(-1, batch)
    scores = np.asarray(samples.scores).reshape(-1, batch, 5)
    advantage = (rewards - rewards.mean(axis=1, keepdims=True)) * batch / (batch - 1)
    estimates = np.mean(advantage[..., None] * scores, axis=1)  # (groups, 5)
    exact = noise.batch_covariance(theta, task, model, batch, "leave_one_out")
    centred = estimates - np.asarray(exact.mean)
    products = centred[:, :, None] * centred[:, None, :]
    se = products.std(axis=0, ddof=1) / np.sqrt(products.shape[0])
    ok = se > 0
    z = (products.mean(axis=0) - np.asarray(exact.covariance))[ok] / se[ok]
    assert np.max(np.abs(z)) < 4.0
    # and it differs from the naive Sigma / B by more than the noise (the test can tell them apart)
    naive = np.asarray(noise.batch_covariance(theta, task, model, batch, "mean").covariance)
    assert np.max(np.abs((products.mean(axis=0) - naive)[ok] / se[ok])) > 4.0


SAMPLING_CASES = [
    # theta, task, model, batch
    (Theta(0.3, 0.0, 0.0), gf.ChainTask.uniform(5), gf.ModelSpec(), 40_000),
    (Theta(0.02, -0.01, 0.01), gf.ChainTask.hardest(5), gf.ModelSpec(), 40_000),  # near 0, hardest only
    (Theta(1.0, -0.5, -0.4), gf.ChainTask.mixture(5, 0.2), gf.ModelSpec(mask_self=False, n_isolated=1), 40_000),
    (
        Theta(0.5, -0.3, -0.2, 0.3, -0.2),
        gf.ChainTask.uniform(5),
        gf.ModelSpec(attention="softmax", tau=0.1, mask_self=False),
        40_000,
    ),
    (Theta(0.4, 0.1, -0.3, -0.2, 0.3), gf.ChainTask.hardest(4), gf.ModelSpec(attention="softmax", tau=0.1), 40_000),
    (Theta(0.5, -0.1, -0.2), gf.ChainTask.uniform(5), gf.ModelSpec(mask_self=False, max_len=6), 40_000),
    (Theta(0.2, 0.1, -0.1, 0.2, 0.1), gf.ChainTask.uniform(4), gf.ModelSpec(attention="softmax", tau=0.1, max_len=4), 40_000),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(SAMPLING_CASES)))
def test_covariance_matches_sampling(case):
    """Every entry of the mean and covariance within 4 standard errors of 40k token-level rollouts:
    base model, near theta = 0 with hardest-only data, self-loops + isolated vertex, softmax, caps."""
    theta, task, model, batch = SAMPLING_CASES[case]
    z_cov, z_mean, _ = _z_scores(theta, task, model, batch, seed=case + 1)
    assert np.max(np.abs(z_cov)) < 4.0 and np.max(np.abs(z_mean)) < 4.0


def _figure_params(task, steps=60, lr=0.05):
    """The flow config of the figure's --quick run (same structure: the compiled SDE is reused)."""
    from gradflow.flow import FlowParams

    return FlowParams(task, gf.ModelSpec(), Theta(0.3, 0.0, 0.0), t1=steps * lr, save_ts=lr * np.arange(steps + 1))


@pytest.fixture(scope="module")
def quick_figure(tmp_path_factory):
    out = tmp_path_factory.mktemp("noise")
    assert cli_main(["figures", "noise", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "noise.json").read_text())


# --------------------------------------------------------------------------------------------------
# Critical batch
# --------------------------------------------------------------------------------------------------


def test_critical_batch():
    """trace(Sigma)/|grad|^2; per start it grows with d at the base model; inf where grad J = 0."""
    model = gf.ModelSpec()
    base = Theta(0.3, 0.0, 0.0)
    task = gf.ChainTask.uniform(8)
    crit = noise.critical_batch(base, task, model)
    noise_stats = noise.gradient_covariance(base, task, model)
    _close(crit.total, np.trace(noise_stats.covariance) / np.sum(np.asarray(noise_stats.mean) ** 2))
    per_d = np.asarray(crit.per_start)
    assert np.all(np.diff(per_d) > 0) and per_d[0] > 1.0
    # per start d equals the total for the task concentrated on d
    _close(per_d[3], noise.critical_batch(base, gf.ChainTask(8, np.eye(7)[3]), model).total, rtol=1e-9)
    # theta = 0: only d = 1 carries a gradient (docs/THEORY.md §5.1)
    zero = noise.critical_batch(Theta(0.0, 0.0, 0.0), gf.ChainTask.hardest(8), model)
    assert np.isinf(float(zero.total))
    assert np.isfinite(float(zero.per_start[0])) and np.all(np.isinf(np.asarray(zero.per_start[1:])))


@pytest.mark.slow
def test_critical_batch_along_trajectory(quick_figure):
    """At every save (NaN saves stay NaN); the config matches the figure's panel (c) (compiled once)."""
    from types import SimpleNamespace

    from gradflow.flow import FlowParams
    from gradflow.plotting import log_times

    ts = log_times(300.0, 60, t_min=1e-2)
    config = FlowParams(gf.ChainTask.uniform(8), gf.ModelSpec(), Theta(0.3, 0.0, 0.0), t1=300.0, save_ts=ts)
    thetas = np.zeros((ts.size, 5))
    thetas[:, 0] = np.linspace(0.3, 2.0, ts.size)
    thetas[:, 2] = np.linspace(0.0, -0.6, ts.size)
    thetas[-1] = np.nan  # a save after a requested stop
    along = noise.critical_batch_along(SimpleNamespace(config=config, ts=ts, theta=thetas))
    assert along.total.shape == (ts.size,) and along.per_start.shape == (ts.size, 7)
    assert np.isnan(along.total[-1]) and np.all(np.isnan(along.per_start[-1]))
    _close(along.total[2], noise.critical_batch(Theta.from_array(thetas[2]), config.task, config.model).total, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# The SGD diffusion and the figure
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_figure_quick_files_and_claims(quick_figure):
    out, data = quick_figure
    for ext in ("png", "pdf", "json"):
        assert (out / f"noise.{ext}").stat().st_size > 0
    # SDE and sampled hit-time statistics agree (z within the stated tolerance) at both batch sizes
    for batch in ("8", "128"):
        entry = data["validation"]["uniform"][batch]
        assert entry["agree"], entry
        assert entry["sde"]["n_seeds"] == data["sde_seeds"] and entry["sampled"]["n_seeds"] == data["seeds"]
    # the small batch spreads the hit time more than the large one (noise ~ 1/sqrt(B))
    v = data["validation"]["uniform"]
    assert v["8"]["sde"]["restricted_std"] > 2.0 * v["128"]["sde"]["restricted_std"]
    # critical batch at the base model grows with d by more than 10x per step at n = 8
    per_d = np.asarray(data["critical_base"]["8"]["per_start"])
    assert np.all(per_d[1:] / per_d[:-1] > 10.0)
    # along the flow: hardest-only data starts with a far larger critical batch than uniform data
    along = data["critical_along"]
    assert along["hardest only"]["critical_batch"][0] > 1e4 * along["uniform"]["critical_batch"][0]
    assert data["diffusion"]["trace_sigma_at_0"] > 0


@pytest.mark.slow
def test_sde_without_noise_is_gradient_descent(quick_figure):
    """B -> infinity: Euler-Maruyama on the SGD grid (dt = lr) is exact gradient descent."""
    from gradflow.training import gradient_descent

    params = _figure_params(gf.ChainTask.uniform(6))
    paths = noise.simulate_sgd(params, 0.05, 10**14, jax.random.split(jax.random.key(3), 32), baseline="leave_one_out", t1=3.0)
    gd = gradient_descent(params, 0.05, 60)
    assert np.max(np.abs(paths.reward - np.asarray(gd.reward)[None])) < 1e-6
    assert np.max(np.abs(paths.theta - np.asarray(gd.theta)[None])) < 1e-5
    # time to a level never reached is inf and counted
    summary = paths.hit_summary(0.999999)
    assert summary["n_not_reached"] == 32 and summary["n_reached"] == 0 and summary["mean"] is None
    assert summary["n_diverged"] == 0 and not np.any(paths.diverged)
    assert np.all(np.isinf(paths.time_to(0.999999)))


@pytest.mark.slow
def test_sde_matches_sampled_training(tmp_path):
    """The full figure: n = 6 uniform and 10 % mixture, B = 8 and 128, 32 sampled seeds against 256 SDE
    seeds; restricted mean and std of the time to J = 0.9 within 3 combined standard errors; the SDE
    is at least 20x faster per seed than sampling at B = 128."""
    assert cli_main(["figures", "noise", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "noise.json").read_text())
    for task_name, entries in data["validation"].items():
        for batch in ("8", "128"):
            assert entries[batch]["agree"], (task_name, batch, entries[batch])
    for key, speed in data["speed"].items():
        if key.endswith("B=128"):
            assert speed["ratio"] >= 20.0, (key, speed)
