"""The closed-form absorption quantities against dense linear algebra and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_id, random_theta, slow_case
from reference import dense_length_per_start, dense_same_side_probability

import gradflow as gf
from gradflow._linalg import SMALL_SYSTEM, gth_solve

MODELS = [
    gf.ModelSpec("linear"),
    gf.ModelSpec("linear", mask_self=False, n_isolated=3),
    gf.ModelSpec("softmax", tau=0.05),
    gf.ModelSpec("softmax", tau=0.3, mask_self=False, n_isolated=2),
]


@pytest.mark.parametrize("model", MODELS, ids=model_id)
@pytest.mark.parametrize("n", [slow_case(2), 3, slow_case(9)])
def test_structured_solve_equals_dense_solve(model, n, rng):
    for _ in range(3):
        theta, task = random_theta(rng), gf.ChainTask.uniform(n)
        h, h_dense = gf.same_side_probability(theta, task, model), dense_same_side_probability(theta, task, model)
        length, length_dense = gf.length_per_start(theta, task, model), dense_length_per_start(theta, task, model)
        assert np.max(np.abs(h - h_dense)) < 1e-10, f"same-side max error {np.max(np.abs(h - h_dense))}"
        assert np.max(np.abs(length - length_dense) / length_dense) < 1e-10, "expected length differs from dense"


@pytest.mark.parametrize(
    "attention, n",
    [("linear", 200), slow_case("softmax", 80), slow_case("softmax", 200)],
)
def test_structured_solve_equals_dense_at_large_n(attention, n):
    model, task = gf.ModelSpec(attention), gf.ChainTask.uniform(n)
    theta = gf.Theta(0.8, -0.2, -0.3, 0.4, 0.1)
    h = gf.same_side_probability(theta, task, model)
    h_dense = dense_same_side_probability(theta, task, model)
    assert np.max(np.abs(h - h_dense)) < 1e-10, f"max error {np.max(np.abs(h - h_dense))} at n = {n}"


def test_linear_chains_mirror_each_other(rng):
    """By the a/b symmetry, P(absorbed at a_n | b_i) = 1 - h(a_i): the dense chain from b_i agrees."""
    model, n = gf.ModelSpec("linear", n_isolated=2), 9
    theta, task = random_theta(rng), gf.ChainTask.uniform(n)
    p = np.asarray(gf.transition_matrix(theta, task, model))
    transient = [v for v in range(2 * n + 2) if v not in (n - 1, 2 * n - 1)]
    h_all = np.linalg.solve(np.eye(len(transient)) - p[np.ix_(transient, transient)], p[transient, n - 1])
    h = np.asarray(gf.same_side_probability(theta, task, model))[::-1]  # by position
    np.testing.assert_allclose(h_all[n - 1 : 2 * n - 2], 1.0 - h, atol=1e-12)


@pytest.mark.parametrize("model", MODELS[::2] + [gf.ModelSpec("softmax", n_isolated=3)], ids=str)
def test_gradient_matches_central_differences(model, rng):
    task = gf.ChainTask(6, rng.dirichlet(np.ones(5)))
    x = jnp.asarray(rng.normal(0.0, 0.7, size=5))
    reward = jax.jit(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, model))  # one program for the 10 differences
    grad = jax.grad(reward)(x)
    eps = 1e-5
    fd = jnp.array([(reward(x + eps * e) - reward(x - eps * e)) / (2 * eps) for e in jnp.eye(5)])
    rel = np.max(np.abs(grad - fd)) / np.max(np.abs(fd))
    assert rel < 1e-6, f"relative gradient error {rel}: grad={grad}, fd={fd}"


def test_reward_ignores_self_loops_but_length_grows(rng):
    task = gf.ChainTask.uniform(8)
    for attention in ("linear", "softmax"):
        theta = random_theta(rng, 0.5)
        masked, free = gf.ModelSpec(attention), gf.ModelSpec(attention, mask_self=False)
        np.testing.assert_allclose(
            gf.same_side_probability(theta, task, masked), gf.same_side_probability(theta, task, free), atol=1e-12
        )
        assert np.all(gf.length_per_start(theta, task, free) > gf.length_per_start(theta, task, masked))


def test_linear_gradient_in_eta_and_delta_is_exactly_zero(rng):
    task = gf.ChainTask.uniform(7)
    grad = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, gf.ModelSpec()))(jnp.asarray(rng.normal(size=5)))
    assert grad[3] == 0.0 and grad[4] == 0.0, f"eta/delta gradient {grad[3:]}"
    softmax_grad = jax.grad(lambda v: gf.expected_reward(gf.Theta.from_array(v), task, gf.ModelSpec("softmax")))(
        jnp.asarray(rng.normal(size=5))
    )
    assert abs(softmax_grad[3]) > 1e-8 and abs(softmax_grad[4]) > 1e-8, "softmax should feel eta and delta"


@pytest.mark.parametrize("model", MODELS, ids=str)
def test_traversal_is_the_product_of_dense_forward_steps(model, rng):
    n, theta = 6, random_theta(rng)
    task = gf.ChainTask.uniform(n)
    traversal = gf.traversal_per_start(theta, task, model)
    for d in range(1, n):
        start = n - d
        p = gf.transition_matrix(theta, task, model, start=start if model.attention == "softmax" else None)
        path = np.prod([p[i - 1, i] for i in range(start, n)])
        assert abs(traversal[d - 1] - path) < 1e-12, f"d={d}: {traversal[d - 1]} vs {path}"


@pytest.mark.parametrize("model", MODELS, ids=str)
def test_step_probabilities_are_the_dense_rows(model, rng):
    n, theta = 7, random_theta(rng)
    steps = gf.step_probabilities(theta, gf.ChainTask.uniform(n), model)
    assert steps.self is steps.stay  # old field name kept as an alias
    p = np.asarray(gf.transition_matrix(theta, n, model))
    total = steps.forward + steps.backward + steps.stay + steps.switch + steps.jump + steps.isolated
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    for i in range(1, n):
        row = p[i - 1]
        assert abs(steps.forward[i - 1] - row[i]) < 1e-12
        assert abs(steps.stay[i - 1] - row[i - 1]) < 1e-12
        assert abs(steps.backward[i - 1] - (row[i - 2] if i >= 2 else 0.0)) < 1e-12
        assert abs(steps.switch[i - 1] - row[n : 2 * n].sum()) < 1e-12
        assert abs(steps.isolated[i - 1] - row[2 * n :].sum()) < 1e-12


def test_forward_traversal_limit_has_minimal_length_and_full_reward(rng):
    """alpha >> 0 > gamma: one forward step per token, so L[d-1] -> d and h -> 1."""
    task, theta = gf.ChainTask.uniform(10), gf.Theta(6.0, -2.0, -4.0)
    for model in MODELS[::2]:
        np.testing.assert_allclose(gf.length_per_start(theta, task, model), np.arange(1, 10), rtol=1e-6)
        np.testing.assert_allclose(gf.same_side_probability(theta, task, model), 1.0, atol=1e-6)
        assert 0.0 <= float(gf.expected_reward(random_theta(rng), task, model)) <= 1.0


def test_quantities_jit_and_vmap_over_theta(rng):
    task, model = gf.ChainTask.uniform(5), gf.ModelSpec()
    xs = jnp.asarray(rng.normal(size=(4, 5)))
    batched = jax.jit(jax.vmap(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)))(xs)
    single = [gf.expected_reward(gf.Theta.from_array(x), task, model) for x in xs]
    np.testing.assert_allclose(batched, single, atol=1e-14)


def test_history_context_is_refused_by_the_closed_form():
    with pytest.raises(ValueError, match="context"):
        gf.expected_reward(gf.Theta(0.3, 0, 0), gf.ChainTask.uniform(4), gf.ModelSpec("softmax", context="history"))


@pytest.mark.parametrize("n_rows", [1, SMALL_SYSTEM, 40])  # written-out elimination, and the scans
def test_batched_tridiagonal_solves_equal_dense_solves(n_rows, rng):
    """vmap of the GTH solve (nested vmaps, an unbatched operand, couplings of both signs) = dense solves."""
    batch, inner = 3, 2
    lower, upper = rng.normal(size=(2, batch, inner, n_rows))
    lower[..., 0], upper[..., -1] = 0.0, 0.0
    excess = rng.uniform(0.1, 1.0, size=(batch, inner, n_rows))
    rhs = rng.normal(size=(n_rows, 3))  # shared by every system: an unbatched operand
    solve = jax.vmap(jax.vmap(lambda *a: gth_solve(*a)[0], in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None))
    x = np.asarray(solve(excess, lower, upper, rhs))
    for b in range(batch):
        for i in range(inner):
            diag = excess[b, i] + np.abs(lower[b, i]) + np.abs(upper[b, i])
            dense = np.diag(diag) - np.diag(lower[b, i, 1:], -1) - np.diag(upper[b, i, :-1], 1)
            np.testing.assert_allclose(x[b, i], np.linalg.solve(dense, rhs), rtol=1e-10, atol=1e-12)


def test_padded_rows_are_exact_no_ops(rng):
    """A row with excess 1, couplings 0 and rhs 0 after the last row changes nothing (issue 17 padding)."""
    n_rows, pad = 9, 4
    lower, upper = rng.uniform(0, 1, size=(2, n_rows))
    lower[0], upper[-1] = 0.0, 0.0
    excess, rhs = rng.uniform(0.1, 1.0, size=n_rows), rng.uniform(size=(n_rows, 2))
    x = np.asarray(gth_solve(excess, lower, upper, rhs)[0])
    padded = [np.concatenate([v, fill * np.ones(pad)]) for v, fill in ((excess, 1.0), (lower, 0.0), (upper, 0.0))]
    y = np.asarray(gth_solve(*padded, np.concatenate([rhs, np.zeros((pad, 2))]))[0])
    np.testing.assert_array_equal(y[:n_rows], x)
    assert np.all(y[n_rows:] == 0.0)
