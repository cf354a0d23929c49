"""Frozen copy of gradflow/objective.py at commit 573e434 (Woodbury + LAPACK gtsv, custom VJP), kept
only so that bench_objective.py can time the old and new solves in one run.

Expected reward and other absorption quantities in closed form (docs/THEORY.md §3).

Every quantity solves an absorbing-chain system g(u) = cost + sum_v P(u, v) g(v) on the 2(n-1)
non-terminal chain vertices (isolated vertices are eliminated exactly).  Row u gives weight
exp(gamma_u deg(v)) to every vertex v except its three neighbours on its own chain, so

    (T - U V^T) g = r,   T tridiagonal (the two chains, local moves),  U V^T rank 2 (far jumps:
                          one column for degree-1 and one for degree-2 targets),

solved in O(n) by Woodbury: one tridiagonal factorisation for the right-hand side and U's two
columns, then a 2x2 system; its gradient is one transposed solve of the same shape.  Linear attention
shares one chain for all starts (one solve); softmax attention gives the start row its own eta, so
the solve is vmapped over starts (O(n) each, batched by _tri_solve's own vmap rule).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.lax.linalg import tridiagonal_solve

from gradflow.model import ModelSpec, RowScores, Theta, chain_a_rows, local_rows, row_normaliser, row_scores, transition_matrix
from gradflow.task import ChainTask


def _require_closed_form(model: ModelSpec) -> None:
    if model.context != "prompt":
        raise ValueError(
            f"context must be 'prompt' for closed-form quantities (got {model.context!r}); "
            "the 'history' context is not Markov and is only available in gradflow.sampling"
        )


SMALL_SYSTEM = 32  # batched systems up to this many rows use unrolled elimination (_thomas)


@custom_vmap
def _tri_solve(lower, diag, upper, rhs):
    """x = T^{-1} rhs, rhs (N, k); T has diagonals lower (lower[0] unused), diag, upper (upper[-1] unused)."""
    return tridiagonal_solve(lower, diag, upper, rhs)


def _thomas(lower, diag, upper, rhs):
    """x = T^{-1} rhs by Thomas elimination unrolled over the N rows, broadcast over leading batch axes.

    No pivoting: T is diagonally dominant by rows (diag = far baseline of every other vertex +
    succ + pred >= |off-diagonals|) and T^T by columns, where elimination without pivoting is stable.
    """
    n_rows = diag.shape[-1]
    scale = 1.0 / diag[..., 0]
    ratios, values = [upper[..., 0] * scale], [rhs[..., 0, :] * scale[..., None]]
    for i in range(1, n_rows):
        scale = 1.0 / (diag[..., i] - lower[..., i] * ratios[-1])
        ratios.append(upper[..., i] * scale)
        values.append((rhs[..., i, :] - lower[..., i, None] * values[-1]) * scale[..., None])
    solution = [values[-1]]
    for i in range(n_rows - 2, -1, -1):
        solution.append(values[i] - ratios[i][..., None] * solution[-1])
    return jnp.stack(solution[::-1], axis=-2)


@_tri_solve.def_vmap
def _tri_solve_batched(axis_size, in_batched, lower, diag, upper, rhs):
    """A batch of B systems: unrolled elimination for small N (one fused kernel, vectorised over the
    batch), else on CPU one block-diagonal system of B*N rows (one LAPACK call).

    jaxlib's batched CPU gtsv splits the batch over XLA's intra-op thread pool and blocks a pool
    thread until the parts finish; two such calls running at once on a 2-thread pool deadlock (seen in
    simulate_many's read-outs, which solve for reward and length side by side), so it is never used.
    Zeroing the unused corners makes the blocks independent: gtsv never pivots across a zero
    sub-diagonal, so the block-diagonal solve is exact.  Other backends keep their batched solver.
    """
    lower, diag, upper, rhs = [
        x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, batched in zip((lower, diag, upper, rhs), in_batched)
    ]
    if diag.shape[-1] <= SMALL_SYSTEM:
        return _thomas(lower, diag, upper, rhs), True

    def one_system(lower, diag, upper, rhs):
        position = jnp.arange(diag.shape[-1])
        lower, upper = jnp.where(position == 0, 0.0, lower), jnp.where(position == diag.shape[-1] - 1, 0.0, upper)
        flat = _tri_solve(lower.reshape(-1), diag.reshape(-1), upper.reshape(-1), rhs.reshape(-1, rhs.shape[-1]))
        return flat.reshape(rhs.shape)

    return jax.lax.platform_dependent(lower, diag, upper, rhs, cpu=one_system, default=tridiagonal_solve), True


def _solve_2x2(m: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """x = m^{-1} b for a 2x2 m by Cramer's rule (a few fused flops; no batched LU custom call)."""
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    return jnp.stack([m[1, 1] * b[0] - m[0, 1] * b[1], m[0, 0] * b[1] - m[1, 0] * b[0]]) / det


def _thin_dot(a, b):
    """a^T b for (N, p) a and (N,) or (N, q) b.  Small N: a fused multiply-reduce, since a vmapped dot
    of thin matrices is a slow library call on CPU; large N: a dot, which streams memory better."""
    if a.shape[0] > SMALL_SYSTEM:
        return a.T @ b
    return jnp.sum(a[:, :, None] * b.reshape(b.shape[0], 1, -1), axis=0).reshape(a.shape[1:] + b.shape[1:])


def _transpose_bands(lower, upper):
    """The (lower, upper) bands of T^T: lower'[i] = upper[i-1], upper'[i] = lower[i+1] (ends unused, 0)."""
    zero = jnp.zeros_like(lower[:1])
    return jnp.concatenate([zero, upper[:-1]]), jnp.concatenate([lower[1:], zero])


@jax.custom_vjp
def _woodbury_solve(lower, diag, upper, rhs, u, v, extra):
    """(x, y): x = (T - u v^T)^{-1} rhs, y = T^{-1} extra; T tridiagonal (lower[0], upper[-1] unused).

    rhs (N,), u and v (N, 2), extra (N, k).  One factorisation of T (LAPACK gtsv on CPU) for all
    1 + 2 + k columns, then a 2x2 capacitance system.  The reverse rule (below) is one transposed
    solve of the same shape: lam = (T - u v^T)^{-T} x_bar, mu = T^{-T} y_bar, then every cotangent is
    an outer product of (lam, mu) with (x, y), which XLA fuses into reductions.
    """
    return _woodbury_forward(lower, diag, upper, rhs, u, v, extra)[0]


def _woodbury_forward(lower, diag, upper, rhs, u, v, extra):
    solved = _tri_solve(lower, diag, upper, jnp.concatenate([rhs[:, None], u, extra], axis=1))
    far = solved[:, 1:3]
    capacitance = jnp.eye(2) - _thin_dot(v, far)
    x = solved[:, 0] + jnp.sum(far * _solve_2x2(capacitance, _thin_dot(v, solved[:, 0])), axis=1)
    y = solved[:, 3:]
    return (x, y), (lower, diag, upper, u, v, x, y, capacitance)


def _woodbury_backward(residuals, cotangents):
    """A = T - u v^T: lam = A^{-T} x_bar (Woodbury with T^T, capacitance^T), mu = T^{-T} y_bar;
    rhs_bar = lam, extra_bar = mu, T_bar[i, j] = -(lam[i] x[j] + mu[i] . y[j]), u_bar = lam (v^T x)^T,
    v_bar = x (u^T lam)^T."""
    lower, diag, upper, u, v, x, y, capacitance = residuals
    x_bar, y_bar = cotangents
    lower_t, upper_t = _transpose_bands(lower, upper)
    solved = _tri_solve(lower_t, diag, upper_t, jnp.concatenate([x_bar[:, None], v, y_bar], axis=1))
    lam = solved[:, 0] + jnp.sum(solved[:, 1:3] * _solve_2x2(capacitance.T, _thin_dot(u, solved[:, 0])), axis=1)
    mu = solved[:, 3:]
    adjoint = jnp.concatenate([lam[:, None], mu], axis=1)  # (N, 1 + k): column j pairs with primal's
    primal = jnp.concatenate([x[:, None], y], axis=1)
    zero = jnp.zeros_like(diag[:1])
    lower_bar = -jnp.concatenate([zero, jnp.sum(adjoint[1:] * primal[:-1], axis=1)])
    upper_bar = -jnp.concatenate([jnp.sum(adjoint[:-1] * primal[1:], axis=1), zero])
    diag_bar = -jnp.sum(adjoint * primal, axis=1)
    return lower_bar, diag_bar, upper_bar, lam, lam[:, None] * _thin_dot(v, x), x[:, None] * _thin_dot(u, lam), mu


_woodbury_solve.defvjp(_woodbury_forward, _woodbury_backward)


def absorption_solve(scores: RowScores, n: int, model: ModelSpec, cost: float, terminal) -> jnp.ndarray:
    """Solve g = cost + P g on the non-terminal chain vertices; g(a_n), g(b_n) = ``terminal``.

    Returns g with shape (2, n-1) (chain a, chain b; positions 1..n-1).  Isolated vertices are
    folded in: an isolated vertex returns to chain vertex v with probability prop. to its own
    weights y(v), so its value is (cost * Z_iso + sum_v y(v) g(v)) / W_iso.
    Linear attention: both chains have the same rows, so s = g_a + g_b solves
    (T - 2 U V1^T) s = r_a + r_b (V1: G1 = s(1), G2 = sum of s(2..n-1)) and d = g_a - g_b solves
    T d = r_a - r_b (the far jumps cancel): n-1 unknowns, four columns, one factorisation.
    """
    rows = local_rows(scores, n, model)
    z = row_normaliser(rows, n, model)
    pos = jnp.arange(1, n)
    m = model.n_isolated
    t_a, t_b = terminal

    y1, y2 = jnp.exp(scores.isolated), jnp.exp(2.0 * scores.isolated)
    w_iso = 4.0 * y1 + (2 * n - 4) * y2
    z_iso = w_iso + m - (1.0 if model.mask_self else 0.0)
    u1 = rows.far1 + m * y1 / w_iso
    u2 = rows.far2 + m * y2 / w_iso

    is_last = (pos == n - 1).astype(float)
    corr_succ = rows.succ - rows.base_succ
    diag = z - (rows.self_ - rows.base_self)
    upper = -corr_succ * (1.0 - is_last)
    lower = -(rows.pred - rows.base_pred)
    common = cost * z + m * cost * z_iso / w_iso + u1 * (t_a + t_b)
    degree1 = (pos == 1).astype(float)

    if model.attention == "linear":
        row = lambda x: jnp.broadcast_to(x, (n - 1,))  # every row alike: chain a stands for both
        lower, diag, upper, u1, u2, common, corr_succ = map(row, (lower, diag, upper, u1, u2, common, corr_succ))
        select = jnp.stack([degree1, 1.0 - degree1], axis=1)
        total, diff = _woodbury_solve(
            lower,
            diag,
            upper,
            2.0 * common + is_last * corr_succ * (t_a + t_b),
            2.0 * jnp.stack([u1, u2], axis=1),
            select,
            (is_last * corr_succ * (t_a - t_b))[:, None],
        )
        return jnp.stack([0.5 * (total + diff[:, 0]), 0.5 * (total - diff[:, 0])])

    rhs = common + is_last * corr_succ * jnp.array([t_a, t_b])[:, None]
    flat = lambda x: jnp.broadcast_to(x, (2, n - 1)).reshape(-1)
    degree1 = flat(degree1)
    select = jnp.stack([degree1, 1.0 - degree1], axis=1)  # V: G1 = sum over a_1, b_1; G2 = the rest
    u = jnp.stack([flat(u1), flat(u2)], axis=1)
    g, _ = _woodbury_solve(flat(lower), flat(diag), flat(upper), flat(rhs), u, select, jnp.zeros((2 * (n - 1), 0)))
    return g.reshape(2, n - 1)


def _per_start(theta: Theta, task: ChainTask, model: ModelSpec, quantity) -> jnp.ndarray:
    """``quantity(scores)[position - 1]`` for each start a_{n-d}, returned by d = 1..n-1 (entry d-1).

    ``quantity`` maps the row scores of one chain (shape (2, n-1)) to a per-position vector.  Linear
    attention has one chain for every start; softmax has one per start (vmapped).
    """
    _require_closed_form(model)
    n = task.n
    if model.attention == "linear":
        return quantity(row_scores(theta, n, model))[::-1]
    at_start = lambda position: quantity(row_scores(theta, n, model, start=position))[position - 1]
    return jax.vmap(at_start)(jnp.arange(1, n))[::-1]


@eqx.filter_jit
def same_side_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """h[d-1] = P(the walk from a_{n-d} is absorbed at its own terminal a_n before b_n)."""
    n = task.n
    return _per_start(theta, task, model, lambda s: absorption_solve(s, n, model, 0.0, (1.0, 0.0))[0])


@eqx.filter_jit
def expected_reward(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """J(theta) = sum_d p[d-1] h[d-1]; the loss is 1 - J."""
    return jnp.sum(task.start_probs * same_side_probability(theta, task, model))


@eqx.filter_jit
def length_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """L[d-1] = expected number of generated tokens from a_{n-d} until the first terminal (>= d)."""
    n = task.n
    return _per_start(theta, task, model, lambda s: absorption_solve(s, n, model, 1.0, (0.0, 0.0))[0])


@eqx.filter_jit
def expected_length(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """E[tokens until the first terminal], start-weighted: sum_d p[d-1] L[d-1]."""
    return jnp.sum(task.start_probs * length_per_start(theta, task, model))


@eqx.filter_jit
def traversal_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """T[d-1] = prod_{i=n-d}^{n-1} P(a_i -> a_{i+1}): the exact forward path, no detour, no self-loop."""
    n = task.n

    def log_path_from(scores):
        rows = chain_a_rows(local_rows(scores, n, model), n)
        log_forward = jnp.log(rows.succ / row_normaliser(rows, n, model))
        return jnp.cumsum(log_forward[::-1])[::-1]  # entry i-1: sum over positions i..n-1

    return jnp.exp(_per_start(theta, task, model, log_path_from))


@eqx.filter_jit
def traversal_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """P(the generated path is exactly the forward path to the terminal), start-weighted."""
    return jnp.sum(task.start_probs * traversal_per_start(theta, task, model))


@eqx.filter_jit
def _dense_per_start(theta: Theta, task: ChainTask, model: ModelSpec, cost: float, terminal) -> jnp.ndarray:
    """Reference: dense solve of (I - Q) g = cost + R t over all non-terminal vertices (O(n^3))."""
    _require_closed_form(model)
    n = task.n
    transient = jnp.array([v for v in range(2 * n + model.n_isolated) if v not in (n - 1, 2 * n - 1)])

    def solve(start):
        p = transition_matrix(theta, task, model, start=start)
        q = p[jnp.ix_(transient, transient)]
        r = cost + p[transient, n - 1] * terminal[0] + p[transient, 2 * n - 1] * terminal[1]
        return jnp.linalg.solve(jnp.eye(transient.size) - q, r)

    if model.attention == "linear":
        return solve(None)[: n - 1][::-1]
    positions = jnp.arange(1, n)
    return jax.vmap(lambda s: solve(s)[s - 1])(positions)[::-1]


def dense_same_side_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """``same_side_probability`` by a dense linear solve on the full transition matrix (tests only)."""
    return _dense_per_start(theta, task, model, 0.0, (1.0, 0.0))


def dense_length_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """``length_per_start`` by a dense linear solve on the full transition matrix (tests only)."""
    return _dense_per_start(theta, task, model, 1.0, (0.0, 0.0))
