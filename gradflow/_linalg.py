"""Private linear algebra of the closed form: GTH-style tridiagonal elimination and a positive Woodbury.

Every system here is an absorbing-chain system with rows in their own scale (each row divided by
its largest weight, so nothing overflows).  Row k of T reads

    diag_k x_k - lower_k x_{k-1} - upper_k x_{k+1} = rhs_k,     diag_k = excess_k + |lower_k| + |upper_k|,

where ``excess_k > 0`` is the row's absolute excess, supplied by the caller as a SUM OF POSITIVE
TERMS (GTH: never 1 - row sum).  The couplings may have either sign (T is then strictly diagonally
dominant; with both >= 0 it is an M-matrix).  Elimination carries the reduced excess instead of the
pivot (Grassmann-Taksar-Heyman style):

    s_k = excess_k + |lower_k| * tau_{k-1},   pivot p_k = s_k + |upper_k|,
    tau_k = s_k / p_k              when lower_{k+1} upper_k > 0 (a fraction, no subtraction),
    tau_k = 1 + |upper_k| / p_k    when lower_{k+1} upper_k < 0,

so with couplings >= 0 every pivot, every multiplier and (for right-hand sides >= 0) every solution
entry is a sum of positive terms: relative accuracy of order n * eps by construction, at any
condition number.  The absolute values are taken with a constant sign (+1 at 0), so derivatives at a
coupling of exactly 0 are the true ones.  Everything is plain jax.numpy (a Python-unrolled loop for
at most ``SMALL_SYSTEM`` rows, ``lax.scan`` above), so JAX derives every derivative, any order, both
modes, and vmap batches it.

A padded row (excess 1, couplings 0, right-hand side 0) is an exact no-op: its solution is 0 and it
does not touch its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import _extended as ext

SMALL_SYSTEM = 4  # up to this many rows the elimination is written out in Python; above, sequential scans


@jax.custom_jvp
def _one_minus_exp(d):
    """1 - e^{-d} (d >= 0), whose derivative is e^{-d} itself (expm1's own, 1 + expm1(-d), cancels for large d)."""
    return -jnp.expm1(-d)


@_one_minus_exp.defjvp
def _one_minus_exp_jvp(primals, tangents):
    (d,), (d_dot,) = primals, tangents
    return _one_minus_exp(d), jnp.exp(-d) * d_dot


def diff_exp(x, y, top, numbers: ext.Numbers = ext.FLOAT, gap=None):
    """exp(x - top) - exp(y - top) without cancellation, smooth at x = y (1 - e^{-|x - y|} on either side); ``gap``:
    x - y given exactly (an extra of 1e-30 on a logit of 30, which x - y rounds to 0)."""
    d = x - y if gap is None else gap
    up = d >= 0
    d_up, d_down = jnp.where(up, d, 0.0), jnp.where(up, 0.0, -d)
    fraction = jnp.where(up, _one_minus_exp(d_up), -_one_minus_exp(d_down))  # of the larger weight, signed
    return numbers.scale(numbers.exp(jnp.where(up, x, y) - top), fraction)


def _unit_sign(x):
    """+1 where x >= 0, -1 where x < 0, as a constant for differentiation."""
    return jax.lax.stop_gradient(jnp.where(x < 0, -1.0, 1.0))


def _scan_recurrence(coef, offset, reverse=False):
    """z_k = offset_k + coef_k z_{k-1}, z_{-1} = 0 (reverse: z_k = offset_k + coef_k z_{k+1}, z_N = 0):
    one sequential pass, rows on axis -2 of offset."""

    def step(z_prev, row):
        c, o = row
        z = o + c[..., None] * z_prev
        return z, z

    init = jnp.zeros_like(offset[..., 0, :])
    rows = jax.lax.optimization_barrier((jnp.moveaxis(coef, -1, 0), jnp.moveaxis(offset, -2, 0)))
    _, z = jax.lax.scan(step, init, rows, reverse=reverse)
    return jnp.moveaxis(z, 0, -2)


def _shift_down(z):
    """(z_{k-1})_k with z_{-1} = 0, on axis -2."""
    return jnp.concatenate([jnp.zeros_like(z[..., :1, :]), z[..., :-1, :]], axis=-2)


def _shift_up(z):
    """(z_{k+1})_k with z_N = 0, on axis -2."""
    return jnp.concatenate([z[..., 1:, :], jnp.zeros_like(z[..., :1, :])], axis=-2)


def _linear_recurrence(coef, offset, reverse=False):
    """z_k = offset_k + coef_k z_{k-1} (z_{-1} = 0), or with reverse=True z_k = offset_k + coef_k z_{k+1}.

    coef (..., N), offset (..., N, k); here every |coef| <= 1 and the quantities are dimensionless
    (ratios within a row), so no product overflows and, with coef, offset >= 0, every entry is a
    positive sum.  Small N: unrolled (JAX differentiates it directly).  Large N: a sequential scan
    wrapped in ``lax.custom_linear_solve`` (matvec z - coef * shift(z), transpose solve = the scan run
    the other way), so every derivative, any order and both modes, is again one vectorised matvec and
    one sequential pass; reverse mode never has to reverse-differentiate a loop.
    """
    n_rows = offset.shape[-2]
    if n_rows <= SMALL_SYSTEM:
        order = range(n_rows - 1, -1, -1) if reverse else range(n_rows)
        out, z = {}, None
        for k in order:
            z = offset[..., k, :] if z is None else offset[..., k, :] + coef[..., k, None] * z
            out[k] = z
        return jnp.stack([out[k] for k in range(n_rows)], axis=-2)
    shift, shift_back = (_shift_up, _shift_down) if reverse else (_shift_down, _shift_up)

    # A z = z - coef * shift(z) = offset;  A^T w = w - shift_back(coef * w)
    def matvec(z):
        return z - coef[..., None] * shift(z)

    def solve(_, b):
        return _scan_recurrence(coef, b, reverse=reverse)

    def transpose_solve(_, b):  # w_k = b_k + coef_{k+1} w_{k+1} (forward problem), mirrored for reverse
        coef_t = shift_back(coef[..., None])[..., 0]
        return _scan_recurrence(coef_t, b, reverse=not reverse)

    return jax.lax.custom_linear_solve(matvec, offset, solve, transpose_solve)


def _reduce_step(s_prev, exc, a_pred, a_succ_prev, flip_prev):
    """One GTH step: s_k = exc_k + |lower_k| tau_{k-1}(s_{k-1})."""
    pivot = s_prev + a_succ_prev
    tau = jnp.where(flip_prev, 1.0 + a_succ_prev / pivot, s_prev / pivot)
    return exc + a_pred * tau


def _reduced_excess(excess, a_pred, a_succ, flip):
    """s_k = excess_k + a_pred_k tau_{k-1}, tau as in the module docstring; s_0 = excess_0 (small systems,
    written out: JAX differentiates it directly; larger ones reduce inside ``_factor_scan``).

    a_pred = |lower|, a_succ = |upper| (>= 0), flip[k] = (lower_{k+1} upper_k < 0).
    """
    s = [excess[..., 0]]
    for k in range(1, excess.shape[-1]):
        s.append(_reduce_step(s[-1], excess[..., k], a_pred[..., k], a_succ[..., k - 1], flip[..., k - 1]))
    return jnp.stack(s, axis=-1)


def _instantiate(tangent, like):
    return jnp.zeros_like(like) if type(tangent) is jax.custom_derivatives.SymbolicZero else tangent


def _signs(lower, upper):
    sign_lower, sign_upper = _unit_sign(lower), _unit_sign(upper)
    next_sign = jnp.concatenate([sign_lower[..., 1:], jnp.ones_like(lower[..., :1])], axis=-1)
    flip = jax.lax.stop_gradient(next_sign * sign_upper < 0)
    return sign_lower, sign_upper, flip


def _solve_unrolled(excess, lower, upper, rhs):
    """Small systems: the elimination written out row by row (JAX differentiates it directly)."""
    sign_lower, sign_upper, flip = _signs(lower, upper)
    s = _reduced_excess(excess, sign_lower * lower, sign_upper * upper, flip)
    pivot = s + sign_upper * upper
    rho, sigma = s / pivot, upper / pivot
    rho_prev = jnp.concatenate([jnp.zeros_like(rho[..., :1]), rho[..., :-1]], axis=-1)
    t = _linear_recurrence(lower * rho_prev / s, rhs / s[..., None])
    return _linear_recurrence(sigma, rho[..., None] * t, reverse=True), s


def _factor_scan(excess, lower, upper, rhs):
    """Large systems, primal: one forward scan (reduced excess s and reduced rhs t together) and one
    backward scan (x).  Returns x, s, rho, sigma, omega (t_k = rhs_k / s_k + omega_k t_{k-1}) and t."""
    sign_lower, sign_upper, flip = _signs(lower, upper)

    def step(carry, row):
        tau_prev, rho_prev, t_prev = carry
        exc, lo, up, s_lo, s_up, fl, r = (
            row[..., 0],
            row[..., 1],
            row[..., 2],
            row[..., 3],
            row[..., 4],
            row[..., 5],
            row[..., 6:],
        )
        s = exc + (s_lo * lo) * tau_prev
        pivot = s + s_up * up
        rho, sigma = s / pivot, up / pivot
        t = r / s[..., None] + (lo * rho_prev / s)[..., None] * t_prev
        tau = jnp.where(fl > 0, 1.0 + s_up * sigma, rho)
        return (tau, rho, t), jnp.concatenate([s[..., None], t], axis=-1)

    # one array in and one out per row: each scanned array costs the loop a slice (a write) per row, the
    # loop's main cost at small n; the loop keeps only s and t, the rest follows elementwise after it
    columns = [excess, lower, upper, sign_lower, sign_upper, jnp.where(flip, 1.0, 0.0)]
    rows = jnp.moveaxis(jnp.concatenate([jnp.stack(columns, axis=-1), rhs], axis=-1), -2, 0)
    zero = jnp.zeros_like(excess[..., 0])
    _, st = jax.lax.scan(step, (zero, zero, jnp.zeros_like(rhs[..., 0, :])), rows)
    st = jnp.moveaxis(st, 0, -2)
    s, t = st[..., 0], st[..., 1:]
    pivot = s + sign_upper * upper
    rho, sigma = s / pivot, upper / pivot
    omega = lower * _shift_down(rho[..., None])[..., 0] / s
    x = _scan_recurrence(sigma, rho[..., None] * t, reverse=True)
    return x, s, rho, sigma, omega, t


def _upper_difference(upper, x, rho, t):
    """|upper_k| x_k / upper_k - x_{k+1} (the change of row k of T x per unit upper_k), as
    sign_k rho_k (t_k - sign_k x_{k+1}) from x_k = rho_k t_k + sigma_k x_{k+1}: where the row is held by its
    coupling (rho_k tiny) x_k and x_{k+1} agree to many digits and their plain difference would keep none."""
    sign = _unit_sign(upper)[..., None]
    return sign * rho[..., None] * (t - sign * _shift_up(x))


def _lower_difference(lower, upper, x, rho, t):
    """|lower_k| x_k / lower_k - x_{k-1}, the same from row k-1's back-substitution (x_{k-1} = rho_{k-1} t_{k-1}
    + sigma_{k-1} x_k): sign_k rho_{k-1} (x_k - sign_k t_{k-1}) unless lower_k upper_{k-1} < 0 (then as written)."""
    sign, flip = _unit_sign(lower)[..., None], _signs(lower, upper)[2]
    plain = sign * x - _shift_down(x)
    held = sign * _shift_down(rho[..., None]) * (x - sign * _shift_down(t))
    return jnp.where(_shift_down(flip[..., None]), plain, held)


@jax.custom_jvp
def _solve_scan(excess, lower, upper, rhs):
    """(x, smallest reduced excess); the latter is for the caller's range check only (zero tangent)."""
    x, s, *_ = _factor_scan(excess, lower, upper, rhs)
    return x, jnp.min(s, axis=-1)


@_solve_scan.defjvp
def _solve_scan_jvp(primals, tangents):
    """dx = T^{-1} (d rhs - dT x), with T^{-1} applied through the primal's factors as two linear
    recurrences in dimensionless quantities (``_linear_recurrence``: reverse mode transposes them)."""
    excess, lower, upper, rhs = primals
    d_exc, d_lo, d_up, d_rhs = (_instantiate(t, x) for t, x in zip(tangents, primals))
    x, s, rho, sigma, omega, t = _factor_scan(excess, lower, upper, rhs)
    d_tx = d_exc[..., None] * x + d_lo[..., None] * _lower_difference(lower, upper, x, rho, t)
    d_tx = d_tx + d_up[..., None] * _upper_difference(upper, x, rho, t)
    t_dot = _linear_recurrence(omega, (d_rhs - d_tx) / s[..., None])
    smallest = jnp.min(s, axis=-1)
    return (x, smallest), (_linear_recurrence(sigma, rho[..., None] * t_dot, reverse=True), jnp.zeros_like(smallest))


def gth_solve(excess, lower, upper, rhs):
    """x = T^{-1} rhs for the row-scaled tridiagonal T above; returns (x, smallest reduced excess).

    The smallest reduced excess s (in row units: each row's largest weight is 1; every pivot is at least
    its s) tells the caller whether float64 held the elimination: below ``TINY_PIVOT`` some reduced row fell
    under the float range and the result must not be trusted; below ``TINY_FOR_DERIVATIVES`` its
    derivatives (which divide by s^2) may not be.

    With s the reduced excesses, p = s + |upper| the pivots, rho = s / p, sigma = upper / p:
        t_k = rhs_k / s_k + (lower_k rho_{k-1} / s_k) t_{k-1}     (t = reduced rhs / reduced excess)
        x_k = rho_k t_k + sigma_k x_{k+1},
    two affine recurrences whose coefficients are at most 1 in magnitude.  Small N: written out;
    large N: two sequential scans, and a JVP that reuses the factors (dx = T^{-1}(d rhs - dT x)).

    Args:
        excess (jax.Array): (..., N) each row's excess of the diagonal over its off-diagonal weights.
        lower (jax.Array): (..., N) the sub-diagonal weights; ``lower[..., 0]`` must be 0 (the caller folds
            known neighbours into the right-hand side).
        upper (jax.Array): (..., N) the super-diagonal weights; ``upper[..., N-1]`` must be 0.
        rhs (jax.Array): (..., N, k) the right-hand sides.

    Returns:
        solution (tuple[jax.Array, jax.Array]): x, (..., N, k), and the smallest reduced excess, (...,) (no gradient).
    """
    if excess.shape[-1] <= SMALL_SYSTEM:
        x, s = _solve_unrolled(excess, lower, upper, rhs)
        return x, jax.lax.stop_gradient(jnp.min(s, axis=-1))
    x, min_pivot = _solve_scan(excess, lower, upper, rhs)
    return x, jax.lax.stop_gradient(min_pivot)


TINY_PIVOT = 1e-200  # a reduced excess below this (in row units) and float64 cannot hold the elimination
TINY_FOR_DERIVATIVES = 1e-150  # ... or its derivatives (they divide by s^2): ``gradflow.objective`` falls back below it


def woodbury_gth(excess, lower, upper, rhs, u, absorb, deg1, valid=None):
    """x = (T - U V^T)^{-1} rhs for an absorbing chain whose far jumps are rank 2 by target degree.

    The capacitance C = I - K, K = V^T T^{-1} U, is rebuilt from alpha = V^T T^{-1} absorb and the
    counts c = V^T 1 (C c = alpha), so its diagonal and its determinant are positive sums (K >= 0):
        C_11 = (alpha_1 + K_12 c_2) / c_1,   C_22 = (alpha_2 + K_21 c_1) / c_2,
        det C = (alpha_1 alpha_2 + alpha_1 K_21 c_1 + alpha_2 K_12 c_2) / (c_1 c_2),
    and C^{-1} = [[C_22, K_12], [K_21, C_11]] / det C >= 0.  Without degree-2 rows the update is rank 1.

    Args:
        excess (jax.Array): (..., N) the diagonal excesses of T (``gth_solve``).
        lower (jax.Array): (..., N) the sub-diagonal of T (``gth_solve``).
        upper (jax.Array): (..., N) the super-diagonal of T (``gth_solve``).
        rhs (jax.Array): (..., N, k) the right-hand sides.
        u (jax.Array): (..., N, 2) the row's (scaled) weight on each degree-1 and on each degree-2
            transient vertex.
        absorb (jax.Array): (..., N) the row's (scaled) rate into the absorbing states,
            absorb = (T - U V^T) 1, supplied as a positive sum.
        deg1 (np.ndarray): (N,) static bools, the transient vertices of degree 1; V = (deg1, not deg1).
        valid (jax.Array | None): (N,) bools, the rows that are vertices (the rest are padding, no-op rows of
            a bucket); None: all.

    Returns:
        solution (tuple[jax.Array, jax.Array]): x, (..., N, k), and the smallest reduced excess of the elimination.
    """
    deg1 = np.asarray(deg1, dtype=bool)
    k = rhs.shape[-1]
    z, min_pivot = gth_solve(excess, lower, upper, jnp.concatenate([rhs, u, absorb[..., None]], axis=-1))
    z_r, z_u, z_a = z[..., :k], z[..., k : k + 2], z[..., k + 2]
    v1, v2 = jnp.asarray(deg1, dtype=z.dtype), jnp.asarray(~deg1, dtype=z.dtype)
    if valid is None:
        c1, c2 = int(deg1.sum()), int((~deg1).sum())
    else:  # padded rows are not vertices: V and its counts see the valid rows only (traced counts)
        v1, v2 = v1 * valid, v2 * valid
        c1, c2 = jnp.sum(v1), jnp.sum(v2)
    a1, a2 = jnp.einsum("n,...n->...", v1, z_a), jnp.einsum("n,...n->...", v2, z_a)
    vr1, vr2 = jnp.einsum("n,...nj->...j", v1, z_r), jnp.einsum("n,...nj->...j", v2, z_r)
    rank1 = lambda: z_r + z_u[..., 0, None] * (vr1 / (a1 / c1)[..., None])[..., None, :]  # C = 1 - K_11 = alpha_1 / c_1
    if valid is None and c2 == 0:
        return rank1(), min_pivot
    c2_safe = c2 if valid is None else jnp.maximum(c2, 1.0)  # padded: the rank-2 branch must stay finite at c2 = 0
    k12 = jnp.einsum("n,...n->...", v1, z_u[..., 1])
    k21 = jnp.einsum("n,...n->...", v2, z_u[..., 0])
    c11 = (a1 + k12 * c2) / c1
    c22 = (a2 + k21 * c1) / c2_safe
    det = (a1 * a2 + a1 * k21 * c1 + a2 * k12 * c2) / (c1 * c2_safe)
    if valid is not None:
        det = jnp.where(c2 > 0, det, 1.0)
    w1 = (c22[..., None] * vr1 + k12[..., None] * vr2) / det[..., None]
    w2 = (k21[..., None] * vr1 + c11[..., None] * vr2) / det[..., None]
    rank2 = z_r + z_u[..., 0, None] * w1[..., None, :] + z_u[..., 1, None] * w2[..., None, :]
    return (rank2 if valid is None else jnp.where(c2 > 0, rank2, rank1())), min_pivot


@jax.custom_jvp
def ratio(x, y):
    """x / y whose derivative is (dx - (x / y) dy) / y: finite wherever x / y is (JAX's x / y derives through
    x y^-2, which overflows for y below 1e-154 even when the ratio is of order 1)."""
    return x / y


@ratio.defjvp
def _ratio_jvp(primals, tangents):
    (x, y), (dx, dy) = primals, tangents
    q = ratio(x, y)
    return q, ratio(dx - q * dy, y)


class CapacitanceOps(NamedTuple):
    """The arithmetic of ``capacitance_solve``: float64 (``FLOAT_OPS``) or ``gradflow._extended`` (``EXTENDED_OPS``)."""

    add: Callable
    scale: Callable
    mul: Callable
    ratio: Callable
    where: Callable


def capacitance_solve(k, alpha, counts, b, ops: CapacitanceOps | None = None) -> list:
    """y = (I - K)^{-1} b for a Woodbury capacitance over disjoint columns (K = C^T T^{-1} U, a few columns), rebuilt
    from the absorption: with c = C^T 1 the column sizes and alpha = C^T T^{-1} absorb, (I - K) c = alpha, so
    C' = (I - K) diag(c) has off-diagonal -K_kl c_l and row sums alpha_k, and a GTH elimination of C' (pivot =
    alpha_k + sum of the remaining K_kl c_l: no 1 - K_kk) keeps its relative accuracy where the columns' walk
    returns to them with probability close to 1.  An empty column (c_k = 0, K's row k 0) is a unit row.

    Args:
        k: (r, r) the capacitance's K (k[i][j]: an array, or nested lists of ``Extended``).
        alpha: (r,) C^T T^{-1} absorb (absorb = (T - U C^T) 1).
        counts (jax.Array): (r,) the column sizes C^T 1.
        b: (r, j) the right-hand sides C^T T^{-1} rhs (b[i]: (j,)).
        ops: the arithmetic (None: float64).

    Returns:
        y as a list of r rows, each (j,).
    """
    ops = ops or FLOAT_OPS
    r = len(counts)
    size = jnp.where(counts > 0, counts, 1.0)
    a = [[ops.scale(k[i][j], counts[j]) for j in range(r)] for i in range(r)]  # the off-diagonal couplings of C'
    e = [ops.where(counts[i] > 0, alpha[i], _one_like(alpha[i], ops)) for i in range(r)]
    b = [b[i] for i in range(r)]
    pivots = []
    for j in range(r):
        pivot = e[j]
        for m in range(j + 1, r):
            pivot = ops.add(pivot, a[j][m])
        pivots.append(pivot)
        for i in range(j + 1, r):
            f = ops.ratio(a[i][j], pivot)
            e[i] = ops.add(e[i], ops.mul(f, e[j]))
            b[i] = ops.add(b[i], ops.mul(f, b[j]))
            for m in range(j + 1, r):
                if m != i:
                    a[i][m] = ops.add(a[i][m], ops.mul(f, a[j][m]))
    y = [None] * r
    for j in range(r - 1, -1, -1):
        total = b[j]
        for m in range(j + 1, r):
            total = ops.add(total, ops.mul(a[j][m], y[m]))
        y[j] = ops.ratio(total, pivots[j])
    return [ops.scale(y[j], size[j]) for j in range(r)]


def _one_like(x, ops: CapacitanceOps):
    return ext.extended(jnp.ones_like(x.m)) if ops is EXTENDED_OPS else jnp.ones_like(x)


FLOAT_OPS = CapacitanceOps(jnp.add, jnp.multiply, jnp.multiply, ratio, jnp.where)
EXTENDED_OPS = CapacitanceOps(ext.add, ext.scale, ext.mul, ext.div, ext.where)


def woodbury_gth_signed(excess, lower, upper, rhs, u, absorb, deg1):
    """``woodbury_gth`` for right-hand sides of either sign: x = solve(rhs+) - solve(rhs-), rhs+- >= 0.

    The solve is linear, so this is exact; both parts go through the positive elimination together
    (one solve, 2k columns) and keep its relative accuracy, and only the final difference can cancel
    (as it must where x itself is small).  max(rhs, 0) and max(-rhs, 0) share the derivative at 0.

    Args:
        excess (jax.Array): (..., N) the diagonal excesses of T.
        lower (jax.Array): (..., N) the sub-diagonal of T.
        upper (jax.Array): (..., N) the super-diagonal of T.
        rhs (jax.Array): (..., N, k) the right-hand sides, of either sign.
        u (jax.Array): (..., N, 2) the far weights by target degree (``woodbury_gth``).
        absorb (jax.Array): (..., N) the absorption rates (``woodbury_gth``).
        deg1 (np.ndarray): (N,) static bools, the transient vertices of degree 1.

    Returns:
        solution (tuple[jax.Array, jax.Array]): x, (..., N, k), and the smallest reduced excess of the elimination.
    """
    k = rhs.shape[-1]
    parts = jnp.concatenate([jnp.maximum(rhs, 0.0), jnp.maximum(-rhs, 0.0)], axis=-1)
    x, min_pivot = woodbury_gth(excess, lower, upper, parts, u, absorb, deg1)
    return x[..., :k] - x[..., k:], min_pivot


# --------------------------------------------------------------------------------------------------
# The same solves in ``gradflow._extended`` numbers (the fallback where float64 cannot hold the rows)
# --------------------------------------------------------------------------------------------------


def _sweep(step, carry, rows, n_rows: int, reverse: bool = False):
    """The outputs of ``step`` over rows (pytrees, rows on axis 0): written out for at most
    ``SMALL_SYSTEM`` rows (JAX differentiates it directly), one ``lax.scan`` above (its step checkpointed:
    reverse mode keeps the carries, not every intermediate: a value+grad's buffer at n = 1e5 95 -> 69 MB)."""
    if n_rows > SMALL_SYSTEM:
        return jax.lax.scan(jax.checkpoint(step, prevent_cse=False), carry, rows, reverse=reverse)[1]
    outputs = [None] * n_rows
    for k in range(n_rows - 1, -1, -1) if reverse else range(n_rows):
        carry, outputs[k] = step(carry, jax.tree.map(lambda x, k=k: x[k], rows))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def _eliminate(excess, lower, upper, rhs):
    """x with rows on axis 0 (excess, lower, upper (N, ...), rhs (N, ..., k): ``Extended``), by the elimination
    of ``gth_solve`` (one forward sweep for s and t, one backward sweep for x), differentiated directly."""
    n_rows = excess.m.shape[0]
    next_sign = jnp.concatenate([_unit_sign(lower.m[1:]), jnp.ones_like(lower.m[:1])])
    flip = next_sign * _unit_sign(upper.m) < 0  # lower_{k+1} upper_k < 0
    col = lambda x: ext.apply(lambda v: v[..., None], x)
    one = ext.extended(jnp.ones_like(excess.m[0]))

    def forward(carry, row):
        tau_prev, rho_prev, t_prev = carry
        exc, lo, up, fl, r = row
        s = ext.add(exc, ext.mul(ext.magnitude(lo), tau_prev))
        p = ext.add(s, ext.magnitude(up))
        rho, sigma = ext.div(s, p), ext.div(up, p)
        t = ext.add(ext.div(r, col(s)), ext.mul(col(ext.div(ext.mul(lo, rho_prev), s)), t_prev))
        tau = ext.where(fl, ext.add(one, ext.div(ext.magnitude(up), p)), rho)
        return (tau, rho, t), (rho, sigma, t)

    start = (ext.zeros(excess.m.shape[1:]), ext.zeros(excess.m.shape[1:]), ext.zeros(rhs.m.shape[1:]))
    rho, sigma, t = _sweep(forward, start, (excess, lower, upper, flip, rhs), n_rows)

    def backward(x_next, row):
        rho_k, sigma_k, t_k = row
        x = ext.add(ext.mul(col(rho_k), t_k), ext.mul(col(sigma_k), x_next))
        return x, x

    return _sweep(backward, ext.zeros(rhs.m.shape[1:]), (rho, sigma, t), n_rows, reverse=True)


def solve_extended(excess, lower, upper, rhs):
    """``gth_solve`` in ``Extended`` numbers, rows on axis -1 (-2 for rhs): x as an ``Extended``."""
    batch = jnp.broadcast_shapes(excess.m.shape[:-1], lower.m.shape[:-1], upper.m.shape[:-1], rhs.m.shape[:-2])
    n_rows, k = excess.m.shape[-1], rhs.m.shape[-1]
    rows_first = lambda x: ext.apply(lambda v: jnp.moveaxis(jnp.broadcast_to(v, batch + (n_rows,)), -1, 0), x)
    rhs = ext.apply(lambda v: jnp.moveaxis(jnp.broadcast_to(v, batch + (n_rows, k)), -2, 0), rhs)
    x = _eliminate(rows_first(excess), rows_first(lower), rows_first(upper), rhs)
    return ext.apply(lambda v: jnp.moveaxis(v, 0, -2), x)


def gth_solve_extended(excess, lower, upper, rhs):
    """``gth_solve`` for ``gradflow._extended.Extended`` rows: x as floats (0 or +-inf beyond float64's range),
    at any logit gap (no pivot leaves the range)."""
    return ext.to_float(solve_extended(excess, lower, upper, rhs))


def woodbury_gth_extended(excess, lower, upper, rhs, u, absorb, deg1, valid=None):
    """``woodbury_gth`` for ``gradflow._extended.Extended`` rows (right-hand sides of either sign: each solved
    by its two positive parts, as ``woodbury_gth_signed``): x as floats."""
    k = rhs.m.shape[-1]
    x = ext.to_float(_woodbury_parts_extended(excess, lower, upper, rhs, u, absorb, deg1, valid))
    return x[..., :k] - x[..., k:]


def woodbury_extended(excess, lower, upper, rhs, u, absorb, deg1, valid=None) -> ext.Extended:
    """``woodbury_gth_extended`` with x as an ``Extended`` (x = x+ - x- in those numbers: a solution beyond
    float64's range, or one that feeds another solve, keeps its digits)."""
    return ext.parts_difference(_woodbury_parts_extended(excess, lower, upper, rhs, u, absorb, deg1, valid))


def _woodbury_parts_extended(excess, lower, upper, rhs, u, absorb, deg1, valid):
    """The Woodbury solve of ``woodbury_gth_extended`` for [rhs+ | rhs-] (2k columns, each >= 0), as ``Extended``."""
    deg1 = np.asarray(deg1, dtype=bool)
    k = rhs.m.shape[-1]
    batch = jnp.broadcast_shapes(rhs.m.shape[:-1], u.m.shape[:-1], absorb.m.shape)
    widen = lambda x: ext.apply(lambda v: jnp.broadcast_to(v, batch + v.shape[-1:]), x)
    columns = [widen(ext.signed_parts(rhs)), widen(u), widen(ext.apply(lambda v: v[..., None], absorb))]
    z = solve_extended(excess, lower, upper, ext.concatenate(columns, -1))
    part = lambda lo, hi: ext.apply(lambda v: v[..., lo:hi], z)
    z_r, z_u0, z_u1, z_a = part(0, 2 * k), part(2 * k, 2 * k + 1), part(2 * k + 1, 2 * k + 2), part(2 * k + 2, 2 * k + 3)
    v1, v2 = (deg1, ~deg1) if valid is None else (deg1 & valid, ~deg1 & valid)
    rows_of = lambda x, mask: ext.total(ext.where(mask[:, None], x, ext.zeros(x.m.shape)), axis=-2)  # (..., cols)
    c1, c2 = jnp.sum(v1), jnp.sum(v2)
    a1, a2 = rows_of(z_a, v1), rows_of(z_a, v2)
    vr1, vr2 = rows_of(z_r, v1), rows_of(z_r, v2)
    lift = lambda x: ext.apply(lambda v: v[..., None, :], x)  # (..., cols) -> (..., 1, cols): over the rows
    rank1 = ext.add(z_r, ext.mul(z_u0, lift(ext.div(vr1, ext.scale(a1, 1.0 / c1)))))  # C = 1 - K_11 = alpha_1 / c_1
    c2_safe = jnp.maximum(c2, 1)  # without degree-2 rows the rank-2 branch must stay finite
    k12, k21 = rows_of(z_u1, v1), rows_of(z_u0, v2)
    c11 = ext.scale(ext.add(a1, ext.scale(k12, c2)), 1.0 / c1)
    c22 = ext.scale(ext.add(a2, ext.scale(k21, c1)), 1.0 / c2_safe)
    det = ext.add(ext.add(ext.mul(a1, a2), ext.scale(ext.mul(a1, k21), c1)), ext.scale(ext.mul(a2, k12), c2))
    det = ext.where(c2 > 0, ext.scale(det, 1.0 / (c1 * c2_safe)), ext.Extended(jnp.ones_like(det.m), jnp.zeros_like(det.e)))
    w1 = ext.div(ext.add(ext.mul(c22, vr1), ext.mul(k12, vr2)), det)
    w2 = ext.div(ext.add(ext.mul(k21, vr1), ext.mul(c11, vr2)), det)
    rank2 = ext.add(z_r, ext.add(ext.mul(z_u0, lift(w1)), ext.mul(z_u1, lift(w2))))
    return ext.where(c2 > 0, rank2, rank1)
