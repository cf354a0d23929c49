"""The two-matrix model (V trained, docs/THEORY.md §10) against the dense token-built chain.

The reference builds the full A (N x N^2) and V (N^2 x N) entry by entry from the ten symmetric numbers
with Python loops (nothing shared with gradflow's orbit tables), the context of query u as the prompt's
edge tokens plus the vertex tokens {s, u} (u counted once), the logits (1/tau) sum_j w_j V[c_j, w], and
one dense solve of the absorbing chain; JAX differentiates it for the gradient.
"""

import itertools
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import slow_case
from reference import (
    dense_logits,
    dense_matrices,
    dense_transition,
    mp,
    mp_absorption,
    mp_chain_trained,
    mp_moments,
    mp_reward_gradient_trained,
    mp_reward_trained,
)

import gradflow as gf
from gradflow import capped, ceilings, compile_cache, sampling, two_matrix

VALUES = ("sigma", "rho", "omega", "mu", "nu")


def random_two_matrix_theta(rng, scale=1.0) -> gf.Theta:
    """Every one of the ten numbers N(0, scale^2), V's around the fixed V."""
    a = rng.normal(0.0, scale, 5)
    v = np.array([1.0, 1.0, 0.0, 0.0, 0.0]) + rng.normal(0.0, scale, 5)
    return gf.Theta(*a, **dict(zip(VALUES, v)))


def dense_greedy(x, n: int, model: gf.ModelSpec, start: int, steps: int):
    """(correct, reached, traversed, length, margin) of the greedy walk from a_start over the dense logits (numpy
    argmax: the first of tied vertices), at most ``steps`` tokens; the margin as greedy's (isolated vertices one)."""
    logits, u, forward, margin = np.asarray(dense_logits(x, n, model, start)), start - 1, True, np.inf
    for length in range(1, steps + 1):
        v = int(np.argmax(logits[u]))
        others = [w for w in range(logits.shape[0]) if w != v and not (w >= 2 * n and v >= 2 * n)]
        margin = min(margin, logits[u, v] - logits[u, others].max())
        forward, u = forward and v == u + 1, v
        if v in (n - 1, 2 * n - 1):
            return v == n - 1, True, forward, length, margin
    return False, False, False, steps, margin


def dense_success(x, n: int, model: gf.ModelSpec, start: int):
    """P(own terminal a_n) from a_start by a dense solve of the token-built chain (jax, differentiable)."""
    p = dense_transition(x, n, model, start)
    transient = np.array([v for v in range(p.shape[0]) if v not in (n - 1, 2 * n - 1)])
    q = p[np.ix_(transient, transient)]
    h = jnp.linalg.solve(jnp.eye(transient.size) - q, p[transient, n - 1])
    return h[list(transient).index(start - 1)]


def dense_capped(x, n: int, model: gf.ModelSpec, start: int, caps: int):
    """(success, reach, E[min(L, T)], traversal) from a_start within T = 1..caps tokens, each (caps,): the
    dense matrix with absorbing terminals propagated step by step (jax, differentiable)."""
    p = dense_transition(x, n, model, start)
    own, other, eye = n - 1, 2 * n - 1, jnp.eye(p.shape[0])
    absorbing = p.at[own].set(eye[own]).at[other].set(eye[other])
    f, g, length, out = eye[own], eye[other], 0.0, []
    path = jnp.prod(jnp.array([p[i - 1, i] for i in range(start, n)]))
    for cap in range(1, caps + 1):
        length = length + 1.0 - f[start - 1] - g[start - 1]
        f, g = absorbing @ f, absorbing @ g
        out.append((f[start - 1], f[start - 1] + g[start - 1], length, path if n - start <= cap else 0.0))
    return tuple(jnp.stack(column) for column in zip(*out))


def labelled_reward(A, V, task: gf.ChainTask, model: gf.ModelSpec, labels):
    """J from the dense A (N x N^2) and V (N^2 x N) when role r (a_1..a_n, b_1..b_n) is vertex labels[r]
    (no isolated vertices; jax, vmappable over labels): the authors' reward for one labelling."""
    n, n_vocab = task.n, A.shape[0]
    column = lambda x, y: n_vocab + x * (n_vocab - 1) + y - (y > x)
    edges = jnp.stack([column(labels[c * n + i], labels[c * n + i + 1]) for c in range(2) for i in range(n - 1)])
    transient = [r for r in range(2 * n) if r not in (n - 1, 2 * n - 1)]
    reward = 0.0
    for d in range(1, n):
        s, rows = n - d - 1, []
        for u in range(2 * n):
            context = jnp.concatenate([edges, labels[jnp.array(sorted({s, u}))]])
            scores = A[labels[u], context]
            weights = jax.nn.softmax(scores) if model.attention == "softmax" else scores
            logits = (weights @ V[context] / model.tau)[labels]  # over roles
            rows.append(jax.nn.softmax(logits.at[u].set(-jnp.inf) if model.mask_self else logits))
        p = jnp.stack(rows)
        q = p[np.ix_(transient, transient)]
        h = jnp.linalg.solve(jnp.eye(len(transient)) - q, p[transient, n - 1])
        reward = reward + task.start_probs[d - 1] * h[transient.index(s)]
    return reward


def dense_length_and_traversal(x, n: int, model: gf.ModelSpec, start: int):
    """(E[tokens to the first terminal], P(the path is exactly the forward path)) from a_start by a dense solve of
    the token-built chain, (I - Q) L = 1 over every transient vertex (isolated ones included; jax)."""
    p = dense_transition(x, n, model, start)
    transient = np.array([v for v in range(p.shape[0]) if v not in (n - 1, 2 * n - 1)])
    q = p[np.ix_(transient, transient)]
    lengths = jnp.linalg.solve(jnp.eye(transient.size) - q, jnp.ones(transient.size))
    path = jnp.prod(jnp.array([p[i - 1, i] for i in range(start, n)]))
    return lengths[list(transient).index(start - 1)], path


def dense_reward(x, task: gf.ChainTask, model: gf.ModelSpec):
    n = task.n
    per_start = jnp.stack([dense_success(x, n, model, n - d) for d in range(1, n)])
    return jnp.sum(task.start_probs * per_start)


CASES = [  # (n, attention, mask_self, n_isolated): n = 2..7, both kinds, masked or not, with and without isolated
    (2, "linear", True, 0),
    slow_case(3, "softmax", False, 1),
    slow_case(4, "linear", False, 2),
    slow_case(5, "softmax", True, 0),
    slow_case(6, "linear", True, 1),
    slow_case(7, "softmax", False, 0),
    (4, "softmax", True, 2),
    slow_case(5, "linear", False, 0),
]


@pytest.mark.parametrize("n, attention, mask, iso", CASES)
def test_reward_and_gradient_equal_the_dense_token_chain(n, attention, mask, iso, rng):
    model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained")
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    closed = jax.jit(jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)))
    dense = jax.jit(jax.value_and_grad(lambda x: dense_reward(x, task, model)))
    for _ in range(3):
        x = random_two_matrix_theta(rng, 0.8).as_array("trained")
        (j, g), (j_ref, g_ref) = closed(x), dense(x)
        np.testing.assert_allclose(j, j_ref, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-11)
    success = two_matrix.same_side_probability(gf.Theta.from_array(x), task, model)
    reference = jax.jit(lambda y: jnp.stack([dense_success(y, n, model, n - d) for d in range(1, n)]))(x)
    np.testing.assert_allclose(success, reference, rtol=1e-11, atol=1e-13)


@pytest.mark.slow  # the default check of this route: test_noise's test_moments_with_v_trained_match_the_dense_token_chain
@pytest.mark.parametrize("n, attention, mask, iso", [(4, "softmax", False, 1), (5, "linear", True, 2)])
def test_split_deviation_equals_the_token_chain_per_start(n, attention, mask, iso, rng):
    """``outcome_per_start(split_deviation=True)`` (e = e_sym + G r, the noise moments' route) gives the 60-digit chain's
    e = h - 1/2 per start to relative accuracy (the dense float64 chain's e of 3e-8 is off by 2e-4 of it) and the
    token-built chain's m = grad h (``reference.mp_moments``, 40 digits)."""
    model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained")
    task = gf.ChainTask.uniform(n)
    own = lambda x: two_matrix.outcome_per_start(gf.Theta.from_array(x, "trained"), task, model, split_deviation=True)[0]
    xs = jnp.stack([random_two_matrix_theta(rng, scale).as_array("trained") for scale in (0.8, 0.8, 3.0)])
    with mp.workdps(60):
        chain = lambda x, start: mp_absorption(mp_chain_trained(np.asarray(x), n, model, start), n)[0][start - 1]
        e_ref = np.array([[float(chain(x, n - d) - mp.mpf(0.5)) for d in range(1, n)] for x in xs])
    deviation = lambda x, d: two_matrix._start_outcome(gf.Theta.from_array(x, "trained"), n, model, n - d, split=True)[2]
    e = jax.jit(jax.vmap(lambda x: jnp.stack([deviation(x, d) for d in range(1, n)])))(xs)
    np.testing.assert_allclose(e, e_ref, rtol=1e-12, atol=0)
    m_ref = np.stack([mp_moments(np.asarray(x), task, model, dps=40)[1] for x in xs])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.jacfwd(own)))(xs), m_ref, rtol=1e-9, atol=1e-15)


def test_negative_self_term_and_large_scores_equal_the_dense_chain():
    """(mu - nu) eta < 0 (the self-loop suppression), and a start term that dominates its row."""
    task = gf.ChainTask.uniform(5)
    for attention, x in itertools.product(
        ("linear", "softmax"),
        [
            np.array([1.5, -0.5, 0.2, 2.0, -1.0, 1.2, 0.7, -0.3, -1.5, 0.5]),
            np.array([0.3, 0.1, -0.4, -2.0, 3.0, -0.5, 1.5, 0.4, 2.5, -0.5]),
        ],
    ):
        model = gf.ModelSpec(attention, tau=0.25, mask_self=False, values="trained")
        closed = gf.expected_reward(gf.Theta.from_array(x), task, model)
        np.testing.assert_allclose(closed, dense_reward(jnp.asarray(x), task, model), rtol=1e-11)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_reward_depends_on_v_only_through_its_differences(attention, rng):
    model = gf.ModelSpec(attention, tau=0.3, n_isolated=1, values="trained")
    task = gf.ChainTask.uniform(4)
    reward = jax.jit(jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)))
    x = random_two_matrix_theta(rng).as_array("trained")
    j, g = reward(x)
    shifted = x + np.array([0, 0, 0, 0, 0, 0.7, 0.7, 0.7, -0.4, -0.4])  # sigma, rho, omega + c; mu, nu + c'
    np.testing.assert_allclose(reward(shifted)[0], j, rtol=1e-12)
    np.testing.assert_allclose(g[7], -(g[5] + g[6]), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(g[9], -g[8], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, mask, iso", [slow_case(2, True, 0), (3, False, 2), slow_case(6, True, 1), slow_case(9, False, 0)])
def test_linear_fixed_v_limit_equals_the_one_matrix_model(n, mask, iso, rng):
    """values="trained" at the fixed V is today's linear model (the current vertex's token has V = 0).  The default run
    takes one case (self-loops kept, isolated vertices); the masked and larger ones run in the slow run."""
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    theta = gf.Theta.from_array(rng.normal(size=5))
    fixed = gf.ModelSpec(mask_self=mask, n_isolated=iso)
    trained = gf.ModelSpec(mask_self=mask, n_isolated=iso, values="trained")
    np.testing.assert_allclose(
        two_matrix.same_side_probability(theta, task, trained), gf.same_side_probability(theta, task, fixed), rtol=1e-12
    )
    g_fixed = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, fixed))(theta.as_array())
    g_trained = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, trained))(theta.as_array("trained"))
    np.testing.assert_allclose(g_trained[:5], g_fixed, rtol=1e-9, atol=1e-14)


def test_fixed_values_are_todays_parameter_vector():
    theta = gf.Theta(0.3, -0.1, 0.2, 0.5, 0.4, sigma=2.0, mu=-1.0)
    assert gf.Theta.fields() == ("alpha", "beta", "gamma", "eta", "delta") and gf.Theta.size() == 5
    assert gf.Theta.size("trained") == 10 and gf.Theta.fields("trained")[5:] == VALUES
    np.testing.assert_array_equal(theta.as_array(), [0.3, -0.1, 0.2, 0.5, 0.4])
    np.testing.assert_array_equal(gf.Theta.from_array(theta.as_array("trained")).as_array("trained"), theta.as_array("trained"))
    batch = gf.Theta.from_array(np.zeros((3, 5)))
    assert batch.sigma.shape == (3,) and float(batch.sigma[0]) == 1.0
    with pytest.raises(ValueError, match="size 10"):
        gf.Theta.from_array(np.zeros(5), values="trained")
    # V carries no gradient with the fixed V, and the fixed-V model ignores it
    model, task = gf.ModelSpec(), gf.ChainTask.uniform(4)
    grads = jax.grad(lambda t: gf.expected_reward(t, task, model))(theta)
    assert all(float(getattr(grads, name)) == 0.0 for name in VALUES)
    plain = gf.Theta(0.3, -0.1, 0.2, 0.5, 0.4)
    assert float(gf.expected_reward(theta, task, model)) == float(gf.expected_reward(plain, task, model))
    np.testing.assert_array_equal(gf.model.orbit_sizes(7, "trained"), np.tile(gf.model.orbit_sizes(7), 2))


@pytest.mark.parametrize("values", ["fixed", "trained"])
def test_config_records_v_and_round_trips(values):
    """to_dict carries model.values and, with V trained, theta0's ten numbers (A then V); from_dict inverts it.
    The fixed-V record is that of earlier versions (theta0's five numbers, the same hash)."""
    theta0 = gf.Theta(0.3, -0.1, 0.2, 0.5, 0.4, sigma=0.9, rho=1.2, omega=0.1, mu=-0.3, nu=0.05)
    model = gf.ModelSpec("softmax", tau=0.4, max_len=6, values=values)
    config = gf.FlowParams(gf.ChainTask.uniform(4), model, theta0 if values == "trained" else theta0.as_array(), t1=3.0)
    record = config.to_dict()
    assert record["model"]["values"] == values
    assert record["theta0"] == np.asarray(theta0.as_array(values)).tolist()
    restored = gf.FlowParams.from_dict(json.loads(json.dumps(record)))
    assert bool(eqx.tree_equal(restored, config))
    assert restored.to_dict() == record and gf.sweep.config_hash(restored) == gf.sweep.config_hash(config)
    other = config.replace(theta0=gf.Theta(0.3, -0.1, 0.2, 0.5, 0.4, sigma=0.8))
    assert (gf.sweep.config_hash(other) != gf.sweep.config_hash(config)) == (values == "trained")


def test_authors_start_and_unsupported_quantities():
    start = gf.model.authors_start(1e-8)
    np.testing.assert_array_equal(start.as_array("trained"), [1e-8] * 7 + [0.0, 1e-8, 0.0])
    model, task = gf.ModelSpec(values="trained"), gf.ChainTask.uniform(5)
    assert abs(float(gf.expected_reward(start, task, model)) - 0.5) < 1e-6
    assert gf.noise.moments_per_start(start, task, model).grad.shape == (4, 10)  # the noise moments cover V trained


CEILING_CASES = [  # (task, model kwargs, theta near the limit): a cap covering every start, or none: sup J = 1
    (gf.ChainTask.uniform(5), dict(attention="softmax", tau=0.2), (30.0, 0, 0, 0, 0, 1, 40, 0, 0, 0)),
    (
        gf.ChainTask.uniform(4),
        dict(attention="softmax", mask_self=False, n_isolated=1, max_len=3),
        (30.0, 0, 0, 0, 0, 1, 40, 0, 0, 0),
    ),
    (gf.ChainTask.uniform(2), dict(mask_self=False, max_len=3), (1.0, 0, 0, 0, 0, 0, 40, 0, 0, 0)),
]


@pytest.mark.parametrize("case", range(len(CEILING_CASES)))
def test_reward_ceiling_with_v_trained_is_one_when_the_cap_covers_every_start(case, rng):
    """V trained: sup J = 1 uncapped or with a cap covering every start, for either attention (V's numbers are
    unbounded), approached at large alpha and rho - omega; above the fixed V's where softmax or n = 2
    self-loops bound that."""
    task, kwargs, near = CEILING_CASES[case]
    model = gf.ModelSpec(values="trained", **kwargs)
    ceiling = ceilings.reward_ceiling(task, model)
    assert ceiling.exact and ceiling.value == 1.0
    assert ceilings.closed_form_ceiling(task, model) == 1.0 == gf.theory.max_reward(task, model)
    reward = lambda x: float(gf.expected_reward(gf.Theta.from_array(jnp.asarray(x, float)), task, model))
    assert 1.0 - 1e-6 < reward(near) <= 1.0
    if case != 1:
        assert ceilings.max_reward(task, gf.ModelSpec(**kwargs)) < 1.0 - 1e-3


def test_reward_ceiling_with_v_trained_beyond_the_cap_is_numerical(rng):
    """Starts beyond the cap are reached by far jumps: a numerical maximisation over the ten numbers, at least
    forward traversal's mass and the fixed V's ceiling; no random theta beats it."""
    task, model = gf.ChainTask.uniform(4), gf.ModelSpec(tau=0.5, max_len=2, values="trained")
    ceiling = ceilings.reward_ceiling(task, model)
    assert not ceiling.exact and ceilings.closed_form_ceiling(task, model) is None
    fixed = ceilings.max_reward(task, gf.ModelSpec(tau=0.5, max_len=2))
    assert ceiling.value >= max(2.0 / 3.0, fixed - 1e-9)
    assert abs(float(gf.expected_reward(gf.Theta.from_array(jnp.asarray(ceiling.theta)), task, model)) - ceiling.value) < 1e-12
    for _ in range(5):
        x = random_two_matrix_theta(rng, 3.0)
        assert float(gf.expected_reward(x, task, model)) <= ceiling.value + 1e-9


GREEDY_CASES = [  # (n, attention, mask_self, n_isolated, cap): n = 2..6, both kinds, masked or not
    (2, "linear", True, 0, None),
    slow_case(3, "softmax", False, 1, None),
    slow_case(4, "linear", False, 2, 3),
    slow_case(5, "softmax", True, 0, None),
    slow_case(6, "linear", True, 1, None),
    slow_case(6, "softmax", False, 0, 4),
    (4, "softmax", True, 2, None),
    slow_case(5, "linear", False, 0, None),
]


def _greedy_thetas(rng):
    """Random two-matrix points at two scales and a trained-looking one (forward, no self-loop, V near fixed)."""
    good = gf.Theta(2.0, -0.5, -0.8, -0.3, 0.2, sigma=0.7, rho=1.4, omega=-0.1, mu=-0.6, nu=0.1)
    return [random_two_matrix_theta(rng, scale) for scale in (0.8, 0.8, 2.0, 2.0)] + [good]


@pytest.mark.parametrize("n, attention, mask, iso, cap", GREEDY_CASES)
def test_greedy_equals_greedy_decoding_of_the_dense_token_chain(n, attention, mask, iso, cap, rng):
    """Greedy decoding with V trained, per start, against argmax walks over the dense token-built logits."""
    model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained", max_len=cap)
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    steps = 2 * n + iso if cap is None else cap
    outcomes = set()
    for theta in _greedy_thetas(rng):
        per = gf.greedy.greedy_per_start(theta, task, model)
        x = theta.as_array("trained")
        reference = np.array([dense_greedy(x, n, model, n - d, steps) for d in range(1, n)])
        got = np.stack([per.correct, per.reached, per.traversed, per.length, per.margin], -1).astype(float)
        # exact ties (two far vertices of one class, e.g. both terminals) are ties of the dense chain up to
        # round-off, where its argmax may go either way: those starts are compared by their margin only
        tied = np.asarray(per.tied)
        np.testing.assert_array_equal(tied, reference[:, 4] <= 1e-10)
        np.testing.assert_array_equal(got[~tied, :4], reference[~tied, :4])
        np.testing.assert_allclose(got[~tied, 4], reference[~tied, 4], rtol=1e-9, atol=1e-11)
        outcomes |= set(map(tuple, reference[~tied, :3]))
        metrics = gf.greedy.greedy_metrics(theta, task, model)
        np.testing.assert_allclose(metrics.reach_rate, task.start_probs @ got[:, 1], rtol=1e-13)
        np.testing.assert_allclose(metrics.traversal_accuracy, task.start_probs @ got[:, 2], rtol=1e-13)
        path = gf.greedy.greedy_path(theta, task, model, n - 1)
        assert len(path) == per.length[-1]
        covered = gf.readouts.read_covered(("greedy_conditional_accuracy", "greedy_reached"), theta, task, model)
        np.testing.assert_array_equal(covered["greedy_reached"], got[:, 1])
        np.testing.assert_array_equal(covered["greedy_conditional_accuracy"], metrics.conditional_accuracy)
    assert len(outcomes) >= 2  # the points reach different greedy outcomes


@pytest.mark.parametrize("n, attention, mask, iso", [CASES[0], *(c if hasattr(c, "marks") else slow_case(*c) for c in CASES[1:])])
def test_uncapped_length_and_traversal_equal_the_dense_token_chain(n, attention, mask, iso, rng):
    """E[tokens to a terminal] (self-loops and isolated detours counted) and the exact-traversal probability, V
    trained, per start and start-weighted with the gradient of the length, against the dense token chain."""
    model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained")
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))

    def dense(x):
        pairs = [dense_length_and_traversal(x, n, model, n - d) for d in range(1, n)]
        return jnp.stack([length for length, _ in pairs]), jnp.stack([path for _, path in pairs])

    closed_length = jax.jit(jax.value_and_grad(lambda x: gf.expected_length(gf.Theta.from_array(x), task, model)))
    dense_length = jax.jit(jax.value_and_grad(lambda x: task.start_probs @ dense(x)[0]))
    for _ in range(3):
        x = random_two_matrix_theta(rng, 0.8).as_array("trained")
        theta = gf.Theta.from_array(x)
        lengths, paths = dense(x)
        np.testing.assert_allclose(gf.length_per_start(theta, task, model), lengths, rtol=1e-10)
        np.testing.assert_allclose(gf.traversal_per_start(theta, task, model), paths, rtol=1e-11, atol=1e-300)
        np.testing.assert_allclose(gf.traversal_probability(theta, task, model), task.start_probs @ paths, rtol=1e-11)
        (value, grad), (value_ref, grad_ref) = closed_length(x), dense_length(x)
        np.testing.assert_allclose(value, value_ref, rtol=1e-10)
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-7, atol=1e-9 * abs(value_ref))
        assert np.all(np.asarray(lengths) >= np.arange(1, n))


def test_uncapped_length_and_traversal_fixed_v_limit(rng):
    """Linear attention at the fixed V: today's lengths and traversal (masked or not, isolated vertices)."""
    task = gf.ChainTask.uniform(5)
    for mask, iso in ((True, 0), (False, 2)):
        fixed = gf.ModelSpec(tau=0.3, mask_self=mask, n_isolated=iso)
        trained = gf.ModelSpec(tau=0.3, mask_self=mask, n_isolated=iso, values="trained")
        for _ in range(3):
            theta = gf.Theta(*rng.normal(0.0, 1.0, 5))
            for fn in (gf.length_per_start, gf.traversal_per_start):
                np.testing.assert_allclose(fn(theta, task, trained), fn(theta, task, fixed), rtol=1e-10)


@pytest.mark.parametrize(
    "attention, mask", [("linear", False), *(slow_case(*c) for c in (("linear", True), ("softmax", True), ("softmax", False)))]
)
def test_greedy_at_the_fixed_v_is_todays_greedy(attention, mask, rng):
    """At the fixed V the two-matrix greedy walks are today's (softmax rows differ by a positive factor only,
    the current vertex's token in the normaliser: the same argmax); linear margins and ties equal too, also at
    the exact ties of theta = (alpha, 0, 0) under both tie rules."""
    n, iso = 5, 1
    task = gf.ChainTask.uniform(n)
    fixed = gf.ModelSpec(attention, tau=0.3, mask_self=mask, n_isolated=iso)
    trained = gf.ModelSpec(attention, tau=0.3, mask_self=mask, n_isolated=iso, values="trained")
    thetas = [gf.Theta(*rng.normal(0.0, 1.5, 5)) for _ in range(4)] + [gf.Theta(0.3, 0.0, 0.0)]
    for theta in thetas:
        for tie_break in ("first", "last"):
            today = gf.greedy.greedy_per_start(theta, task, fixed, tie_break=tie_break)
            two = gf.greedy.greedy_per_start(theta, task, trained, tie_break=tie_break)
            for field in ("correct", "reached", "traversed", "length"):
                np.testing.assert_array_equal(getattr(two, field), getattr(today, field))
            if attention == "linear":
                np.testing.assert_array_equal(two.tied, today.tied)
                np.testing.assert_allclose(two.margin, today.margin, rtol=1e-12, atol=1e-14)


def test_readouts_cover_greedy_lengths_and_traversal_with_v_trained():
    for trained in (gf.ModelSpec(values="trained"), gf.ModelSpec(values="trained", max_len=4)):
        for name in gf.readouts.READOUTS:
            assert gf.readouts.covers(name, trained) == (name in gf.readouts.TRAINED_V), name
    assert set(gf.readouts.TRAINED_V) == set(gf.readouts.READOUTS) and not gf.readouts.TRAINED_V_CAPPED
    assert gf.training.RECORDED is gf.readouts.RECORDED and set(gf.readouts.RECORDED) <= set(gf.readouts.TRAINED_V)


STEP_CASES = [
    (2, "linear", True, 0),
    *(slow_case(*c) for c in ((5, "softmax", False, 2), (6, "linear", False, 1), (4, "softmax", True, 1))),
]


@pytest.mark.parametrize("n, attention, mask, iso", STEP_CASES)
def test_step_probabilities_equal_the_dense_token_chain(n, attention, mask, iso, rng):
    """V trained: the step probabilities of a_i's row seen from the start a_i, and the read-outs given a move,
    equal the row of the token-built chain; at the fixed V (linear) they are today's."""
    model = gf.ModelSpec(attention=attention, mask_self=mask, n_isolated=iso, values="trained", tau=0.7)
    theta, task = random_two_matrix_theta(rng), gf.ChainTask.uniform(n)
    steps = two_matrix.step_probabilities(theta, task, model)
    names = ("forward_prob", "backward_prob", "switch_prob", "jump_prob", "isolated_prob")
    given_move = gf.readouts.read(names, theta, task, model)
    for i in range(1, n):
        p = np.asarray(dense_transition(theta.as_array("trained"), n, model, i))[i - 1]
        kinds = {
            "forward": p[i],
            "backward": p[i - 2] if i >= 2 else 0.0,
            "stay": p[i - 1],
            "switch": p[n : 2 * n].sum(),
            "jump": sum(p[j] for j in range(n) if abs(j - (i - 1)) >= 2),
            "isolated": p[2 * n :].sum(),
            "move": 1.0 - p[i - 1],
        }
        for kind, want in kinds.items():
            np.testing.assert_allclose(getattr(steps, kind)[i - 1], want, rtol=1e-12, atol=1e-15, err_msg=kind)
        for name in names:
            np.testing.assert_allclose(given_move[name][i - 1], kinds[name[:-5]] / kinds["move"], rtol=1e-12, atol=1e-15)
    if attention == "linear":
        fixed = gf.ModelSpec(mask_self=mask, n_isolated=iso, tau=0.7)
        at_fixed = gf.Theta(*theta.as_array()[:5])
        ours, today = two_matrix.step_probabilities(at_fixed, task, model), gf.step_probabilities(at_fixed, task, fixed)
        for kind in ("forward", "backward", "stay", "switch", "jump", "isolated"):
            np.testing.assert_allclose(getattr(ours, kind), getattr(today, kind), rtol=1e-13, atol=1e-16)


CAPPED_CASES = [  # (n, attention, mask_self, n_isolated, caps): every cap 1..2n in the slow cases; the first and last here
    (2, "linear", True, 0, (1, 4)),
    slow_case(3, "softmax", False, 1, (1, 3, 6)),
    slow_case(4, "linear", False, 2, (2, 8)),
    pytest.param(4, "softmax", True, 0, range(1, 9), marks=pytest.mark.slow),
    pytest.param(5, "softmax", True, 1, range(1, 11), marks=pytest.mark.slow),
    pytest.param(6, "linear", False, 0, range(1, 13), marks=pytest.mark.slow),
    pytest.param(7, "softmax", False, 0, range(1, 15), marks=pytest.mark.slow),
    pytest.param(7, "linear", True, 1, range(1, 15), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n, attention, mask, iso, caps", CAPPED_CASES)
def test_capped_reward_and_gradient_equal_the_dense_token_chain(n, attention, mask, iso, caps, rng):
    """The capped closed form (one recursion per start) against the dense token chain propagated T steps."""
    model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained")
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    x = random_two_matrix_theta(rng, 0.8).as_array("trained")
    starts = [n - d for d in range(1, n)]
    dense = lambda y: jnp.stack([jnp.stack(dense_capped(y, n, model, start, max(caps))) for start in starts])  # (n-1, 4, caps)
    reference = np.asarray(jax.jit(dense)(x))
    grad_reference = jax.jit(jax.jacrev(lambda y: task.start_probs @ dense(y)[:, 0]))(x)  # (caps, 10)
    for cap in caps:
        capped_model = gf.ModelSpec(attention, tau=0.4, mask_self=mask, n_isolated=iso, values="trained", max_len=cap)

        @jax.jit
        def closed(y, m=capped_model):
            theta = gf.Theta.from_array(y)
            j, g = jax.value_and_grad(lambda z: gf.expected_reward(gf.Theta.from_array(z), task, m))(y)
            return (
                j,
                g,
                gf.expected_loss(theta, task, m),
                gf.same_side_probability(theta, task, m),
                capped.per_start(theta, task, m),
            )

        j, g, loss, success, per_start = closed(x)
        ref = reference[:, :, cap - 1]
        np.testing.assert_allclose(j, task.start_probs @ ref[:, 0], rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(loss, task.start_probs @ (1.0 - ref[:, 0]), rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(g, grad_reference[cap - 1], rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(success, ref[:, 0], rtol=1e-11, atol=1e-14)
        for k, field in enumerate(("success", "reach", "length", "traversal")):
            np.testing.assert_allclose(
                getattr(per_start, field), ref[:, k], rtol=1e-11, atol=1e-14, err_msg=f"{field}, cap {cap}"
            )


@pytest.mark.slow
def test_capped_fixed_v_limit_equals_the_one_matrix_model(rng):
    """Linear attention at the fixed V: the trained-V recursion is today's capped result, every read-out."""
    for n, mask, iso, cap in [(2, True, 0, 1), (3, False, 2, 4), (5, True, 1, 3), (6, False, 0, 12)]:
        task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
        theta = gf.Theta.from_array(rng.normal(size=5))
        fixed = gf.ModelSpec(mask_self=mask, n_isolated=iso, max_len=cap)
        trained = gf.ModelSpec(mask_self=mask, n_isolated=iso, max_len=cap, values="trained")
        for ours, today in zip(capped.per_start(theta, task, trained), capped.per_start(theta, task, fixed)):
            np.testing.assert_allclose(ours, today, rtol=1e-13, atol=1e-300)
        g_fixed = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, fixed))(theta.as_array())
        g_trained = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, trained))(theta.as_array("trained"))
        np.testing.assert_allclose(g_trained[:5], g_fixed, rtol=1e-10, atol=1e-15)


def test_capped_sampled_reward_agrees_with_the_closed_form():
    model = gf.ModelSpec("softmax", tau=0.5, mask_self=False, values="trained", max_len=4)
    task = gf.ChainTask.uniform(4)
    theta = gf.Theta(0.8, -0.3, 0.1, -0.6, 0.2, sigma=1.3, rho=0.6, omega=0.1, mu=0.9, nu=-0.2)
    mean, stderr = sampling.estimate_reward(theta, task, model, jax.random.PRNGKey(4), 4000)
    closed = gf.expected_reward(theta, task, model)
    assert 0.05 < float(closed) < 0.95 and float(closed) < float(
        gf.expected_reward(theta, task, gf.ModelSpec("softmax", tau=0.5, mask_self=False, values="trained"))
    )
    z = (mean - closed) / stderr
    assert abs(float(z)) < 4.5, f"z = {float(z)}"


@pytest.mark.slow
def test_full_coordinate_adam_is_per_entry_adam_on_the_dense_matrices():
    """Adam in full coordinates (gradient_descent) = optax.adam on every entry of the dense A and V, the reward
    averaged over all labellings of the vertices (so its gradient is the same on every entry of an orbit)."""
    n, lr, steps = 3, 1e-2, 5
    model = gf.ModelSpec(tau=0.2, mask_self=False, values="trained")
    task = gf.ChainTask(n, [0.3, 0.7])
    perms = jnp.array(list(itertools.permutations(range(2 * n))))
    average = lambda AV: jnp.mean(jax.vmap(lambda labels: labelled_reward(*AV, task, model, labels))(perms))
    dense_grad = jax.jit(jax.grad(average))
    a_kind, v_kind, _ = dense_matrices(np.arange(10), 2 * n)
    # at scale 1e-8 an entry's gradient is ~1e-20, the sum of O(1e-8) terms that cancel: the dense float64 route
    # holds it to ~1e-3 (Adam turns it into the step: g << eps), so the steps are compared to 1e-2 there; atol: a
    # gradient that is 0 up to round-off moves by lr * round-off / eps
    for scale, rtol, atol in ((1e-8, 1e-2, 1e-18), (0.3, 1e-9, 1e-10)):
        start = gf.model.authors_start(scale)
        run = gf.training.gradient_descent(gf.FlowParams(task, model, start), lr, steps, optimizer="adam", coords="full")
        reduced = gf.training.gradient_descent(gf.FlowParams(task, model, start), lr, steps, optimizer="adam")
        A, V, _ = dense_matrices(jnp.asarray(start.as_array("trained")), 2 * n)
        opt = optax.adam(lr)
        state = opt.init((A, V))
        x0 = start.as_array("trained")
        for k in range(steps + 1):
            for j in range(10):  # every entry of an orbit moves as the orbit coordinate
                entries = A[a_kind == j] if j < 5 else V[v_kind == j]
                moved, expected = entries - x0[j], run.theta[k, j] - x0[j]
                np.testing.assert_allclose(moved, expected, rtol=rtol, atol=atol, err_msg=f"scale {scale}, step {k}, number {j}")
            updates, state = opt.update(jax.tree.map(jnp.negative, dense_grad((A, V))), state)
            A, V = optax.apply_updates((A, V), updates)
        if scale == 1e-8:  # eps meets the orbit gradient, N s_k times an entry's: Adam on the orbits is another optimizer
            assert np.max(np.abs(reduced.theta[1] - run.theta[1])) > 1e-3 * lr


@pytest.mark.slow
def test_exact_training_with_v_trained_reduced_and_full():
    """SGD on the ten numbers (reduced: lr grad J; full: lr grad J / orbit sizes), Adam on them (reduced), the
    read-outs recorded (every one has a closed form); ``gradient_descent_many`` equals one by one."""
    model = gf.ModelSpec(tau=0.3, mask_self=False, values="trained", max_len=5)
    task = gf.ChainTask.uniform(3)
    config = gf.FlowParams(task, model, gf.model.authors_start(0.2))
    grad = jax.jit(jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)))
    sizes = np.asarray(config.orbit_sizes())
    assert sizes.shape == (10,)
    lr, steps = 0.5, 4
    for optimizer, coords in (("sgd", "reduced"), ("sgd", "full"), ("adam", "reduced")):
        run = gf.training.gradient_descent(config, lr, steps, optimizer=optimizer, coords=coords)
        opt = optax.sgd(lr) if optimizer == "sgd" else optax.adam(lr)
        x = config.theta0.as_array("trained")
        state = opt.init(x)
        for k in range(steps):
            np.testing.assert_allclose(run.theta[k], x, rtol=1e-12, atol=1e-15)
            g = grad(x) / (sizes if coords == "full" else 1.0)
            update, state = opt.update(-g, state, x)
            x = optax.apply_updates(x, update)
        np.testing.assert_allclose(run.theta[steps], x, rtol=1e-12, atol=1e-15)
    theta = gf.Theta.from_array(run.theta[2])
    np.testing.assert_allclose(run.reward[2], gf.expected_reward(theta, task, model), rtol=1e-13)
    per = capped.per_start(theta, task, model)
    np.testing.assert_allclose(run.success_per_start[2], per.success, rtol=1e-13)
    np.testing.assert_allclose(run.expected_length[2], gf.expected_length(theta, task, model), rtol=1e-13)
    steps_at = two_matrix.step_probabilities(theta, task, model)  # recorded too: every read-out has a closed form
    np.testing.assert_allclose(run.forward_prob[2], steps_at.forward / steps_at.move, rtol=1e-13)
    assert run.reward[-1] > run.reward[0]
    greedy = gf.greedy.greedy_metrics(theta, task, model)
    np.testing.assert_array_equal(run.greedy_accuracy[2], greedy.accuracy)
    np.testing.assert_array_equal(run.greedy_traversal_accuracy[2], greedy.traversal_accuracy)
    configs = [config, gf.FlowParams(task, model, gf.model.authors_start(0.1))]
    many = gf.training.gradient_descent_many(configs, lrs=[lr, 0.2], steps=steps, optimizer="adam")
    np.testing.assert_allclose(many[0].theta, run.theta, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("coords, t1", [slow_case("reduced", 30.0), ("full", 400.0)])
def test_flow_with_v_trained_conserves_the_balances(coords, t1):
    """The flow of the ten numbers from the authors' start escapes the saddle while |A|^2 - |V|^2 of the edge
    tokens and of the vertex tokens (orbit-weighted in full coordinates) stay at their start values."""
    model = gf.ModelSpec(tau=0.2, mask_self=False, values="trained")
    start = gf.model.authors_start(1e-3)
    params = gf.FlowParams(gf.ChainTask.uniform(3), model, start, t1=t1, coords=coords, rtol=1e-10, atol=1e-12)
    trajectory = gf.simulate(params)
    assert trajectory.theta.shape == (201, 10) and trajectory.reward[-1] > 0.9
    np.testing.assert_array_equal(trajectory.theta[0], start.as_array("trained"))
    last = gf.Theta.from_array(trajectory.theta[-1])
    steps_at = two_matrix.step_probabilities(last, params.task, model)  # the flow records the step read-outs too
    np.testing.assert_allclose(trajectory.forward_prob[-1], steps_at.forward / steps_at.move, rtol=1e-13)
    np.testing.assert_allclose(trajectory.expected_length[-1], gf.expected_length(last, params.task, model), rtol=1e-13)
    np.testing.assert_allclose(trajectory.traversal_prob[-1], gf.traversal_probability(last, params.task, model), rtol=1e-13)
    sizes = params.orbit_sizes() if coords == "full" else None
    thetas = gf.Theta.from_array(trajectory.theta)
    balance = np.asarray(two_matrix.balances(thetas, sizes))
    weights = np.ones(5) if sizes is None else np.asarray(sizes)[:5]
    a_edge = np.sum(weights[:3] * trajectory.theta[:, :3] ** 2, axis=1)
    drift = np.max(np.abs(balance - balance[0]))
    assert drift < 1e-8 * np.max(a_edge), f"drift {drift}"
    assert np.ptp(a_edge) > 1e4 * drift  # |A|^2 itself grows by orders of magnitude more


@pytest.mark.slow
def test_escape_time_grows_like_log_one_over_scale():
    """From authors_start(scale) the flow sits at the saddle for a time linear in log(1/scale)."""
    model = gf.ModelSpec(tau=0.2, mask_self=False, values="trained")
    scales = np.array([1e-8, 1e-6, 1e-4, 1e-2])
    configs = [gf.FlowParams(gf.ChainTask.uniform(3), model, gf.model.authors_start(s), t1=1e4) for s in scales]
    times = np.array(gf.theory.escape_times(configs))
    slope, intercept = np.polyfit(np.log(1.0 / scales), times, 1)
    assert slope > 0 and np.all(np.diff(times) < 0)
    np.testing.assert_allclose(times, slope * np.log(1.0 / scales) + intercept, rtol=0.02)


@pytest.mark.parametrize("attention", [slow_case("linear"), "softmax"])
def test_token_level_transition_equals_the_dense_route(attention, rng):
    """``gradflow.sampling`` with the trained V builds the same chain as the reference, for random labels."""
    n, iso = 4, 1
    model = gf.ModelSpec(attention, tau=0.5, mask_self=False, n_isolated=iso, values="trained")
    theta = random_two_matrix_theta(rng)
    n_vocab = 2 * n + iso
    A, V = sampling.full_attention(theta, n_vocab), sampling.full_values(theta, n_vocab)
    A_ref, V_ref, _ = dense_matrices(jnp.asarray(theta.as_array("trained")), n_vocab)
    np.testing.assert_array_equal(A, A_ref)
    np.testing.assert_array_equal(V, V_ref)
    inst = sampling.sample_instances(gf.ChainTask.uniform(n), n_vocab, jax.random.PRNGKey(0), 1)
    start = int(inst.start[0])
    log_p = sampling.transition_log_probs(A, inst.labels[0], inst.edge_columns[0], start, n, model, V)
    # closed form of one start against the token chain's absorption
    p = np.exp(np.asarray(log_p))
    transient = [v for v in range(n_vocab) if v not in (n - 1, 2 * n - 1)]
    h = np.linalg.solve(np.eye(len(transient)) - p[np.ix_(transient, transient)], p[transient, n - 1])
    closed = two_matrix.same_side_probability(theta, gf.ChainTask.uniform(n), model)[n - start - 2]
    np.testing.assert_allclose(h[transient.index(start)], closed, rtol=1e-11)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_sampled_reward_agrees_with_the_closed_form(attention):
    model = gf.ModelSpec(attention, tau=0.5, values="trained")
    task = gf.ChainTask.uniform(4)
    theta = gf.Theta(0.8, -0.3, 0.1, -0.6, 0.2, sigma=1.3, rho=0.6, omega=0.1, mu=0.9, nu=-0.2)
    mean, stderr = sampling.estimate_reward(theta, task, model, jax.random.PRNGKey(3), 4000)
    z = (mean - gf.expected_reward(theta, task, model)) / stderr
    assert abs(float(z)) < 4.5, f"z = {float(z)}"


def test_sampled_gradient_agrees_with_the_closed_form():
    model = gf.ModelSpec("linear", tau=0.5, values="trained")
    task = gf.ChainTask.uniform(3)
    theta = gf.Theta(0.5, -0.2, 0.1, -0.4, 0.3, sigma=1.2, rho=0.8, omega=0.1, mu=0.6, nu=-0.1)
    grad, stderr = sampling.estimate_gradient(theta, task, model, jax.random.PRNGKey(5), 4000)
    exact = jax.grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))(theta.as_array("trained"))
    assert grad.shape == (10,)
    z = (grad - exact) / stderr
    assert np.max(np.abs(z)) < 4.5, f"z = {np.asarray(z)}"


def test_history_context_uses_the_trained_vertex_rows():
    """With V trained the generated vertices write on the logits: linear attention is no longer Markov."""
    model = gf.ModelSpec("linear", tau=0.5, mask_self=False, context="history", values="trained")
    n, n_vocab = 3, 6
    theta = gf.Theta(0.5, -0.2, 0.1, -0.4, 0.3, mu=0.6)
    A, V = sampling.full_attention(theta, n_vocab), sampling.full_values(theta, n_vocab)
    labels, edges = jnp.arange(n_vocab), jnp.array([sampling.edge_column(x, y, n_vocab) for x, y in gf.model.edge_list(n)])
    once = sampling.next_log_probs(A, labels, edges, 1, jax.nn.one_hot(0, n_vocab) + jax.nn.one_hot(1, n_vocab), n, model, V)
    twice = sampling.next_log_probs(A, labels, edges, 1, jax.nn.one_hot(0, n_vocab) + 2 * jax.nn.one_hot(1, n_vocab), n, model, V)
    # one more copy of u's token raises u's logit by (mu - nu) eta / tau, relative to the others
    shift = np.asarray(twice - once)
    np.testing.assert_allclose(shift[1] - shift[0], 0.6 * -0.4 / 0.5, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# large |theta| / tau: finite and equal to the mpmath chain (issue 23 item 2)
# --------------------------------------------------------------------------------------------------

SCALE_CASES = [  # (attention, mask_self, n_isolated, |theta| / tau scale, draws)
    slow_case("linear", True, 0, 30.0, 3),
    pytest.param("softmax", True, 0, 30.0, 3, marks=pytest.mark.slow),
    pytest.param("linear", False, 0, 100.0, 3, marks=pytest.mark.slow),
    pytest.param("softmax", False, 1, 100.0, 3, marks=pytest.mark.slow),
    pytest.param("linear", True, 1, 1e3, 3, marks=pytest.mark.slow),
    pytest.param("softmax", True, 0, 1e3, 3, marks=pytest.mark.slow),
    pytest.param("linear", False, 0, 1e3, 3, marks=pytest.mark.slow),
    pytest.param("linear", True, 0, 1e4, 3, marks=pytest.mark.slow),
    pytest.param("linear", False, 1, 1e4, 3, marks=pytest.mark.slow),
]


def _scaled_draw(rng, scale, tau=0.2):
    return rng.normal(size=10) * scale * tau


@pytest.mark.parametrize("attention, mask, iso, scale, draws", SCALE_CASES)
def test_v_trained_at_large_scale_equals_the_mpmath_chain(attention, mask, iso, scale, draws):
    """Ten numbers N(0, (scale tau)^2): logit gaps of scale^2 tau.  The eager reward (float64, extended where
    float64 gave a NaN) and the extended program's value and gradient are finite and equal the 60-digit chain;
    a gradient component to 1e-9 relative or 1e-13 absolute (components far below J's scale are float64 round-off
    of J's own terms there)."""
    task = gf.ChainTask.uniform(5)
    model = gf.ModelSpec(attention, mask_self=mask, n_isolated=iso, values="trained")
    extended = gf.ModelSpec(attention, mask_self=mask, n_isolated=iso, values="trained", numbers="extended")
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, extended)))
    rng = np.random.default_rng(int(scale) + 7 * iso + mask)
    for _ in range(draws):
        x = _scaled_draw(rng, scale)
        j_ref = float(mp_reward_trained(x, task, model)[0])
        eager = float(gf.expected_reward(gf.Theta.from_array(jnp.asarray(x)), task, model))
        j, g = value_and_grad(jnp.asarray(x))
        np.testing.assert_allclose([eager, float(j)], j_ref, rtol=1e-9, atol=1e-15)
        if scale <= 100:
            np.testing.assert_allclose(g, mp_reward_gradient_trained(x, task, model), rtol=1e-9, atol=1e-13)
        else:
            assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.slow
def test_v_trained_softmax_reward_at_1e4_equals_the_mpmath_chain():
    """Softmax with V trained at |theta| / tau = 1e4 (logit gaps ~ 2e6): the eager reward equals the 60-digit chain
    (its gradient: ``test_v_trained_softmax_gradient_at_large_scale_equals_the_mpmath_chain``)."""
    task = gf.ChainTask.uniform(5)
    model = gf.ModelSpec("softmax", mask_self=False, n_isolated=1, values="trained")
    rng = np.random.default_rng(10008)
    for _ in range(3):
        x = _scaled_draw(rng, 1e4)
        j = float(gf.expected_reward(gf.Theta.from_array(jnp.asarray(x)), task, model))
        np.testing.assert_allclose(j, float(mp_reward_trained(x, task, model)[0]), rtol=1e-9, atol=1e-15)


# a draw whose softmax reverse-mode gradient was NaN (uncapped and capped, n = 5, start 4): the start's own row held
# exp(delta - log Z) = inf for a delta token it does not hold, and the untaken branch's inf * 0 poisoned the cotangent
NAN_DRAW_1E4 = (-1108.01, 1129.85, -1977.76, 124.76, 1858.65, -1353.73, 3905.82, 2268.16, 2744.21, -422.31)


@pytest.mark.slow
def test_softmax_row_scores_hold_no_overflow_for_tokens_the_row_lacks():
    """Softmax, V trained, at NAN_DRAW_1E4: b is 0 on the rows without a predecessor and d on the start's own row
    (the tokens they do not hold), and the reverse-mode gradient of the finite logits is finite and equals forward
    mode (before: exp(delta - log Z) overflowed to inf on the start's row, NaN in reverse mode only)."""
    n, start, model, x = 5, 4, gf.ModelSpec("softmax", values="trained"), jnp.asarray(NAN_DRAW_1E4)
    (a, b, g, e, d), _ = two_matrix.row_scores(gf.Theta.from_array(x), n, model, start)
    pos = np.tile(np.arange(1, n), 2)
    assert np.all(np.asarray(b)[pos == 1] == 0.0) and float(d[start - 1]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(v))) for v in (a, b, g, e, d))

    def finite_logits(y):
        logits = two_matrix.start_logits(gf.Theta.from_array(y), n, model, start)
        return jnp.stack([jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0)) for v in logits])

    reverse, forward = jax.jacrev(finite_logits)(x), jax.jacfwd(finite_logits)(x)
    assert np.all(np.isfinite(np.asarray(reverse)))
    np.testing.assert_allclose(reverse, forward, rtol=1e-12, atol=1e-12)


SOFTMAX_GRADIENT_CASES = [  # (mask_self, n_isolated, |theta| / tau scale, random draws, with NAN_DRAW_1E4)
    slow_case(True, 0, 1e4, 0, True),
    pytest.param(False, 1, 1e4, 3, True, marks=pytest.mark.slow),
    pytest.param(True, 0, 1e4, 3, False, marks=pytest.mark.slow),
    pytest.param(False, 1, 1e3, 3, False, marks=pytest.mark.slow),
    pytest.param(True, 0, 1e3, 3, False, marks=pytest.mark.slow),
    pytest.param(False, 1, 300.0, 3, False, marks=pytest.mark.slow),  # its third draw: ``test_extended_exponent_...``
    pytest.param(True, 0, 300.0, 3, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("mask, iso, scale, draws, nan_draw", SOFTMAX_GRADIENT_CASES)
def test_v_trained_softmax_gradient_at_large_scale_equals_the_mpmath_chain(mask, iso, scale, draws, nan_draw):
    """Softmax with V trained at |theta| / tau = 300, 1e3, 1e4 (seeded draws, NAN_DRAW_1E4 among them): the extended
    program's reverse-mode gradient is finite and equals the 60-digit chain's and forward mode's (1e-9 relative or 1e-13
    absolute, as above: J's own terms are O(1), so its float64 round-off is 1e-16 of them); where the float64
    reward is finite its gradient is too and the same (float64 gives NaN, never a wrong number, beyond its range)."""
    task = gf.ChainTask.uniform(5)
    model = gf.ModelSpec("softmax", mask_self=mask, n_isolated=iso, values="trained")
    extended = gf.ModelSpec("softmax", mask_self=mask, n_isolated=iso, values="trained", numbers="extended")
    reward = lambda m: lambda y: gf.expected_reward(gf.Theta.from_array(y), task, m)
    reverse = jax.jit(jax.grad(reward(extended)))
    forward, floats = jax.jit(jax.jacfwd(reward(extended))), jax.jit(jax.value_and_grad(reward(model)))
    rng = np.random.default_rng(int(scale) + 7 * iso + mask)
    for x in [_scaled_draw(rng, scale) for _ in range(draws)] + ([np.array(NAN_DRAW_1E4)] if nan_draw else []):
        g = np.asarray(reverse(jnp.asarray(x)))
        assert np.all(np.isfinite(g)), x
        np.testing.assert_allclose(g, mp_reward_gradient_trained(x, task, model), rtol=1e-9, atol=1e-13, err_msg=str(x))
        if draws:  # the slow cases (two more programs to compile; NAN_DRAW_1E4's float64 reward is NaN)
            np.testing.assert_allclose(g, forward(jnp.asarray(x)), rtol=1e-9, atol=1e-13, err_msg=str(x))
            j, g_float = floats(jnp.asarray(x))
            if np.isfinite(float(j)):
                np.testing.assert_allclose(g_float, g, rtol=1e-9, atol=1e-13, err_msg=str(x))


@pytest.mark.slow
def test_extended_exponent_and_mantissa_agree_under_jit_vmap():
    """Issue 23: at this draw (softmax, V trained, one isolated vertex, self-loops, |theta| / tau = 300) an isolated
    row's pi(terminal) is exactly 1/2, log 1/2 sat on the cut of floor(log_x / ln 2), and XLA (jit of the vmap over
    starts) computed log_x twice an ulp apart, once for the exponent and once for the mantissa: a factor 2 on one
    weight, a reward of 0.5989.  The extended reward, jitted (both CPU emitters) and per start under jit(vmap),
    equals the eager one and mpmath's."""
    rng = np.random.default_rng(307)
    x = jnp.asarray([_scaled_draw(rng, 300.0) for _ in range(3)][2])
    task = gf.ChainTask.uniform(5)
    model = gf.ModelSpec("softmax", mask_self=False, n_isolated=1, values="trained", numbers="extended")
    j_ref = float(mp_reward_trained(np.asarray(x), task, model)[0])
    reward = lambda y: gf.expected_reward(gf.Theta.from_array(y), task, model)
    lowered = jax.jit(reward).lower(x)
    for j in (reward(x), compile_cache.compile_lowered(lowered)(x), lowered.compile()(x)):
        np.testing.assert_allclose(float(j), j_ref, rtol=1e-9)
    outcome = lambda y, s: two_matrix._start_solve(gf.Theta.from_array(y), 5, model, s)[0][:2]  # (h, q)
    per_start = lambda y: jax.vmap(lambda s: outcome(y, s))(jnp.arange(1, 5))
    np.testing.assert_allclose(jax.jit(per_start)(x), np.full((4, 2), 0.5), atol=1e-6)


@pytest.mark.parametrize("scale, draws", [*(slow_case(s, 2) for s in (100.0, 300.0, 1e3, 1e4)), (1e4, 1)])
def test_capped_v_trained_at_large_scale_equals_the_dense_chain(scale, draws):
    """Capped with V trained (float64: the recursion steps probabilities, rows in their own scale) at |theta| / tau
    = 100, 300, 1e3, 1e4: per-start success equals the dense token chain propagated T steps, and the reverse-mode
    gradient is finite, for linear attention (masked and self-loops) and softmax; softmax's also equals forward mode
    and the dense chain's gradient (1e-12 absolute: the dense chain's own float64 round-off at J's scale), NAN_DRAW_1E4
    among its draws at 1e4 (n = 5: its reverse mode was NaN).  A far class with no member in a row no longer sets the row's scale
    (it underflowed every weight of the row: z = 0).  ``draws`` random points per kind: one in the default run, two
    at every scale in the slow run."""
    cap, rng, kinds = 6, np.random.default_rng(int(scale)), (("linear", True), ("linear", False), ("softmax", False))
    cases = [(attention, mask, 4, jnp.asarray(_scaled_draw(rng, scale))) for attention, mask in kinds for _ in range(draws)]
    cases += [("softmax", False, 5, jnp.asarray(NAN_DRAW_1E4))] if scale == 1e4 else []
    for attention, mask, n, x in cases:
        model, task = gf.ModelSpec(attention, mask_self=mask, values="trained", max_len=cap), gf.ChainTask.uniform(n)
        per = gf.capped.per_start(gf.Theta.from_array(x), task, model)
        dense_per = lambda y: jnp.stack([dense_capped(y, n, model, start, cap)[0][-1] for start in range(1, n)])
        # the reference jitted (one program per case, its gradient in the same one for softmax): eagerly, each of its
        # hundreds of small ops compiles on first use
        if attention == "linear":
            dense, dense_grad = jax.jit(dense_per)(x), None
        else:
            dense, dense_grad = jax.jit(lambda y: (dense_per(y), jax.grad(lambda z: jnp.mean(dense_per(z)))(y)))(x)
        np.testing.assert_allclose(np.asarray(per.success)[::-1], dense, atol=1e-9, err_msg=f"{attention} {mask} {x}")
        reward = lambda y: gf.expected_reward(gf.Theta.from_array(y), task, model)
        grad = np.asarray(jax.grad(reward)(x))
        assert np.all(np.isfinite(grad)), (attention, mask, x)
        if attention == "linear":
            continue
        np.testing.assert_allclose(grad, jax.jacfwd(reward)(x), rtol=1e-9, atol=1e-12, err_msg=f"{attention} {mask} {x}")
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-7, atol=1e-12, err_msg=f"{attention} {mask} {x}")


def test_v_trained_float64_is_finite_at_moderate_scale():
    """The float64 program alone (no fallback) is finite for |theta| / tau = 10 (it was NaN for 2 of 40 draws at n = 6
    before the Woodbury columns were made disjoint and its capacitance positive)."""
    task, model = gf.ChainTask.uniform(6), gf.ModelSpec(values="trained")
    value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model))))
    j, g = value_and_grad(jnp.asarray(np.random.default_rng(0).normal(size=(40, 10)) * 10 * 0.2))
    assert np.all(np.isfinite(np.asarray(j))) and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_v_trained_property_no_nan_where_the_reference_is_finite(attention):
    """Seeded random draws at |theta| / tau = 10 .. 300: the eager reward (float64 with the extended fallback) is
    finite wherever the mpmath chain is, and equal to it."""
    task, model = gf.ChainTask.uniform(4), gf.ModelSpec(attention, values="trained", mask_self=False)
    rng = np.random.default_rng(23)
    for scale in (10.0, 30.0, 100.0, 300.0):
        for _ in range(6):
            x = _scaled_draw(rng, scale)
            j = float(gf.expected_reward(gf.Theta.from_array(jnp.asarray(x)), task, model))
            np.testing.assert_allclose(j, float(mp_reward_trained(x, task, model)[0]), rtol=1e-9, atol=1e-15)
