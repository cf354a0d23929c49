"""Expected reward and other absorption quantities in closed form (docs/THEORY.md §3), exact to
relative round-off by construction.

Every quantity solves an absorbing-chain system on the non-terminal chain vertices; isolated
vertices are eliminated exactly (by symmetry each has the same value; P(own terminal) = 1/2 there).
Row u gives weight exp(g_u deg v) to every vertex v except its chain neighbours; the local weight
minus that far weight is the coupling c (succ, pred) of a tridiagonal T.  Self-loops never change
which terminal is reached: they drop out of every probability system exactly and change a length
only through the row's cost Z_u (its total weight, self included) over its moving weight (a sum).

Linear attention (every row alike).  By the a/b symmetry h(b_i) = 1 - h(a_i), so the far jumps
fold into constants and h = P(own terminal), q = 1 - h and e = h - 1/2 each solve the SAME
(n-1)-row tridiagonal system, with right-hand sides W + m/2 (q), the same plus a_n's coupling in the
last row (h), and c_succ/2 in the last row only (e):  no low-rank term, no 1 - p anywhere.  The
expected length folds to T L - U V^T L = cost with U V^T rank 2 (far targets by degree), solved by the
positive Woodbury of ``gradflow._linalg``.  Softmax attention: the start row differs, so each start
solves the 2(n-1)-row system (both chains) with the rank-2 far part, by the same positive Woodbury.

Accuracy (see README "Choices"): each row is scaled by its largest weight (log-sum-exp), its
diagonal excess is a sum of positive terms, and GTH elimination (``gradflow._linalg.gth_solve``)
never subtracts when the couplings are >= 0 (alpha >= gamma and beta >= gamma: the learning regime):
h, q, e, lengths to relative accuracy ~ n eps.  With a negative coupling (a far weight above the
local one) T stays strictly diagonally dominant and the cancellations are bounded (relative accuracy
1e-12 or better in the tests).  J is read from e near 1/2, from q near 1 and from h near 0, so
J - 1/2, 1 - J and J keep their leading digits and so do their gradients (JAX differentiates the
plain jax.numpy solve, any order, both modes).  An expected length above 1e300 is returned as inf.
Where the row-scaled float64 elimination cannot hold a solve or its derivatives (a reduced row below
1e-150 of its row's scale: logit gaps of a few hundred) the value and every derivative are NaN, never a
wrong number.  ``ModelSpec(numbers="extended")`` solves the same rows in ``gradflow._extended`` numbers
(float64 digits, any exponent): finite at any logit gap, a separate compiled program.  The eager public
functions fall back to it on the host where float64 gave a NaN (``finite_or_extended``); a float64
program holds no extended code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import capped, two_matrix
from gradflow._extended import EXTENDED, FLOAT, Extended, Numbers, signed_magnitude
from gradflow._linalg import (  # noqa: F401
    SMALL_SYSTEM,
    TINY_FOR_DERIVATIVES,
    TINY_PIVOT,
    diff_exp,
    gth_solve,
    gth_solve_extended,
    solve_extended,
    woodbury_extended,
    woodbury_gth,
    woodbury_gth_extended,
    woodbury_gth_signed,
)
from gradflow.model import (
    ModelSpec,
    RowLogits,
    Theta,
    chain_a_logits,
    is_data,
    logit_when,
    own_and_other,
    row_log_total,
    row_logits,
    row_scores,
    self_loops,
    with_extended_numbers,
)
from gradflow.policy import distinct_rows, distinct_rows_traced
from gradflow.task import ChainTask, PaddedTask, by_distance, layout

LENGTH_LIMIT = 1e300  # expected lengths above this are returned as inf


def _require_closed_form(model: ModelSpec) -> None:
    if model.context != "prompt":
        raise ValueError(
            f"context must be 'prompt' for closed-form quantities (got {model.context!r}); "
            "the 'history' context is not Markov and is only available in gradflow.sampling"
        )


def _capped_when_set(capped_quantity):
    """The one capped/uncapped choice: the decorated closed form, or ``capped_quantity`` (the same
    quantity with at most ``model.max_len`` tokens, docs/THEORY.md §7.1) when the model sets a cap."""

    def dispatch(uncapped_quantity):
        @functools.wraps(uncapped_quantity)
        def quantity(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
            chosen = uncapped_quantity if model.max_len is None else capped_quantity
            return chosen(theta, task, model)

        return quantity

    return dispatch


# --------------------------------------------------------------------------------------------------
# Rows in their own scale
# --------------------------------------------------------------------------------------------------


class _Scaled(eqx.Module):
    """One system's rows, each divided by exp(top) (its largest logit): the inputs of the solves, in float64
    or (the fallback) ``gradflow._extended.Extended`` numbers; ``top`` is always a float."""

    excess: jnp.ndarray  # absolute excess (positive sum)
    lower: jnp.ndarray  # c_pred (0 in the first row)
    upper: jnp.ndarray  # c_succ (0 in the last row: a_n absorbs)
    rhs_q: jnp.ndarray  # P(other terminal) system: rate into the other terminal + isolated share
    rhs_h: jnp.ndarray  # P(own terminal) system
    rhs_e: jnp.ndarray  # deviation e = h - 1/2 system (linear, folded)
    far1: jnp.ndarray  # f1: the row's weight on each degree-1 vertex (+ isolated detours)
    far2: jnp.ndarray  # f2: the same on each degree-2 vertex
    to_own: jnp.ndarray  # rate into a_n from a chain-a last row (succ + isolated share)
    cost: jnp.ndarray  # Z_u + m Z_iso / (2 Y): expected tokens per unit row weight
    top: jnp.ndarray  # the row's scale: its largest logit (no gradient)


def _scale_rows(rows: RowLogits, numbers: Numbers = FLOAT) -> _Scaled:
    """The scaled row quantities of docs/THEORY.md §3.3 for the chain-a rows given (any broadcast shape).

    With W = 2 e^g + (n-2) e^{2g} (one chain's far weights), m isolated vertices, Y the isolated row's
    W: diag = 2W + m + c_succ + c_pred, and the absolute excess diag - |c_succ| - |c_pred| becomes a
    positive sum by removing the far weight of a neighbour whose coupling is negative and adding its
    local weight twice.  The last row's successor a_n absorbs (its coupling goes to the rhs).
    ``numbers``: float64 (``FLOAT``), or ``EXTENDED`` (no underflow at any logit gap).
    """
    n, m = rows.n, rows.n_isolated
    add, scale, where = numbers.add, numbers.scale, numbers.where
    g = rows.g
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in rows[:8]))
    bc = lambda x: jnp.broadcast_to(x, shape)
    succ, pred, self_, g = bc(rows.succ), bc(rows.pred), bc(rows.self_), bc(g)
    base_succ, base_pred = bc(rows.base_succ), bc(rows.base_pred)
    has_pred, d1s, d1p = (bc(x) for x in (rows.has_pred, rows.deg1_succ, rows.deg1_pred))
    last = jnp.broadcast_to(rows.last, shape)
    pres = lambda flag: jnp.where(flag, 1.0, 0.0)

    interior = n >= 3  # a Python bool, or traced when n is (``gradflow.task.PaddedTask``)
    counted = is_data(m) or m > 0  # the isolated terms are in the program (a traced m of 0 adds exact zeros)
    # the row scale: its largest logit (stop-gradient: any constant scale gives the same solution)
    cands = [succ, jnp.where(has_pred, pred, -jnp.inf), g]
    cands += logit_when(interior, 2.0 * g) + logit_when(m > 0, jnp.zeros(shape)) + logit_when(rows.self_present, self_)
    top = jax.lax.stop_gradient(jnp.max(jnp.stack(cands), axis=0))
    ex = lambda logit: numbers.exp(logit - top)
    none = numbers.zeros(shape)

    # isolated detours: an isolated vertex returns to chain vertex v with prob. e^{g_iso deg v} / (2Y)
    g_iso = jnp.broadcast_to(rows.g_iso, shape)
    log_2y = jnp.where(
        interior,
        jnp.log(2.0) + jnp.logaddexp(g_iso + jnp.log(2.0), 2.0 * g_iso + jnp.log(jnp.maximum(n - 2, 1))),
        jnp.log(4.0) + g_iso,
    )
    # isolated share on a deg-1 vertex, on a deg-2 vertex
    iso1, iso2 = (scale(ex(k * g_iso - log_2y), m) if counted else none for k in (1.0, 2.0))
    if is_data(interior):
        e_g2 = where(interior, ex(jnp.where(interior, 2.0 * g, top)), none)
    else:
        e_g2 = ex(2.0 * g) if interior else none
    e_g, e_m = ex(g), (scale(ex(jnp.zeros(shape)), m) if counted else none)

    c_succ = where(last, none, diff_exp(succ, base_succ, top, numbers))
    c_pred = where(has_pred, diff_exp(jnp.where(has_pred, pred, base_pred), base_pred, top, numbers), none)
    neg_s = (~last) & (succ < base_succ)
    neg_p = has_pred & (pred < base_pred)

    # absolute excess: 2W + m, minus 2 far(v) + 2 local(v) for each neighbour v with negative coupling;
    # the last row: 2W + m - far(a_n) + succ (+ the same pred correction)
    n1 = 4.0 - jnp.where(last, 1.0, 2.0 * pres(neg_s & d1s)) - 2.0 * pres(neg_p & d1p)
    n2 = 2.0 * (n - 2) - 2.0 * pres(neg_s & ~d1s) - 2.0 * pres(neg_p & ~d1p)
    pred_or_top = jnp.where(has_pred, pred, top)
    excess = add(add(add(scale(e_g, n1), scale(e_g2, n2)), e_m), scale(ex(succ), jnp.where(last, 1.0, 2.0 * pres(neg_s))))
    excess = add(excess, scale(ex(pred_or_top), 2.0 * pres(neg_p)))

    half_w = add(e_g, scale(e_g2, 0.5 * (n - 2)))  # W / 2
    rhs_q = add(scale(half_w, 2.0), scale(e_m, 0.5))
    to_own = add(ex(succ), iso1)  # eff. weight into a_n from the last row (actual succ + isolated detour)
    rhs_h = where(last, add(add(add(e_g, scale(e_g2, n - 2)), ex(succ)), scale(e_m, 0.5)), rhs_q)
    rhs_e = where(last, scale(diff_exp(succ, g, top, numbers), 0.5), none)

    # cost: Z_u (all weights, self included when present) + m Z_iso / (2Y), Z_iso = 2Y + m - 1 + [self]
    cost = add(add(ex(succ), scale(ex(pred_or_top), pres(has_pred))), scale(e_g, bc(rows.far1)))
    cost = add(add(cost, scale(e_g2, bc(rows.far2))), e_m)
    present = rows.self_present
    if is_data(present):  # its weight, 0 where masked (the exponent kept finite there: no NaN in a derivative)
        cost = add(cost, where(present, ex(jnp.where(present, self_, top)), none))
    elif present:
        cost = add(cost, ex(self_))
    if counted:
        extra = m - 1 + (pres(present) if is_data(present) else int(present))
        cost = add(cost, e_m)
        cost = add(cost, scale(ex(-log_2y), m * extra)) if is_data(extra) or extra else cost
    return _Scaled(excess, c_pred, c_succ, rhs_q, rhs_h, rhs_e, add(e_g, iso1), add(e_g2, iso2), to_own, cost, top)


# --------------------------------------------------------------------------------------------------
# The solves
# --------------------------------------------------------------------------------------------------


@jax.custom_jvp
def _check_pivot(min_pivot, values):
    """NaN where float64 could not hold the elimination or its derivatives (``_linalg.TINY_FOR_DERIVATIVES``),
    in the value and in every derivative: never a wrong number, never a silent zero gradient
    (``finite_or_extended`` then takes the extended numbers)."""
    return jnp.where(min_pivot >= TINY_FOR_DERIVATIVES, values, jnp.nan)


@_check_pivot.defjvp
def _check_pivot_jvp(primals, tangents):
    min_pivot, values = primals
    return _check_pivot(min_pivot, values), tangents[1] * jnp.where(min_pivot >= TINY_FOR_DERIVATIVES, 1.0, jnp.nan)


def _linear_rows(theta: Theta, n, model: ModelSpec, rows: int | None = None, numbers: Numbers = FLOAT) -> _Scaled:
    """The scaled rows a_1..a_{n-1} under linear attention, each kind of row (``distinct_rows``: at most
    four) scaled once and gathered: O(1) exponentials at any n, O(n) arithmetic.

    ``rows``: None (n a Python int: n - 1 rows), or the row slots of a bucket when n is traced
    (``PaddedTask``): the slots past n - 1 are exact no-ops (excess 1, no coupling, no right-hand side)."""
    if rows is None:
        positions, kind = distinct_rows(n)
    else:
        positions, kind, valid = distinct_rows_traced(n, rows)
    distinct = _scale_rows(row_logits(row_scores(theta, n, model), n, model, positions), numbers)
    if rows is None:
        return jax.tree_util.tree_map(lambda x: x[kind], distinct)
    # a traced kind: selects, not a gather (a batched gather, and its scatter-add transpose, cost 5x the rows)
    pick = lambda x: jnp.select([valid & (kind == k) for k in range(4)], [x[k] for k in range(4)], 0.0)
    no_op = jax.tree_util.tree_map(pick, distinct)
    return dataclasses.replace(no_op, excess=numbers.where(valid, no_op.excess, numbers.exp(jnp.zeros(rows))))


def _tridiagonal(t, rhs, numbers: Numbers):
    """``gth_solve`` of the rows t = (excess, lower, upper), NaN where float64 could not hold it; or in
    ``EXTENDED`` numbers."""
    if numbers is EXTENDED:
        return gth_solve_extended(*t, rhs)
    x, min_pivot = gth_solve(*t, rhs)
    return _check_pivot(min_pivot, x)


def _woodbury(t, rhs, u, absorb, deg1, valid=None, signed: bool = False, numbers: Numbers = FLOAT):
    """``woodbury_gth`` (``signed``: ``woodbury_gth_signed``) of the rows t = (excess, lower, upper), NaN where
    float64 could not hold it; or in ``EXTENDED`` numbers (either sign)."""
    if numbers is EXTENDED:
        return woodbury_gth_extended(*t, rhs, u, absorb, deg1, valid)
    solve = woodbury_gth_signed if signed else woodbury_gth
    x, min_pivot = solve(*t, rhs, u, absorb, deg1, *([] if valid is None else [valid]))
    return _check_pivot(min_pivot, x)


def _linear_probabilities(theta: Theta, n, model: ModelSpec, rows: int | None = None, numbers: Numbers = FLOAT):
    """(h, q, e) on chain a, positions 1..n-1 (linear attention): one tridiagonal, three columns
    (``rows``: a bucket's row slots for a traced n, the slots past n - 1 giving 0)."""
    s = _linear_rows(theta, n, model, rows, numbers)
    x = _tridiagonal((s.excess, s.lower, s.upper), numbers.stack([s.rhs_h, s.rhs_q, s.rhs_e], -1), numbers)
    return x[:, 0], x[:, 1], x[:, 2]


def _linear_length(theta: Theta, n, model: ModelSpec, rows: int | None = None, numbers: Numbers = FLOAT):
    """Expected tokens to absorption from a_i (= from b_i), linear attention: folded rank-2 Woodbury
    (``rows``: a bucket's row slots for a traced n, the slots past n - 1 giving 0)."""
    s = _linear_rows(theta, n, model, rows, numbers)
    slots = n - 1 if rows is None else rows
    last = jnp.arange(slots) == n - 2
    absorb = numbers.where(last, numbers.add(s.far1, s.to_own), numbers.scale(s.far1, 2.0))  # into a_n and b_n
    u = numbers.scale(numbers.stack([s.far1, s.far2], -1), 2.0)  # folded: the b chain's far targets count too
    deg1 = np.arange(slots) == 0
    valid = None if rows is None else jnp.arange(slots) < n - 1
    cost = numbers.apply(lambda v: v[:, None], s.cost)
    return _woodbury((s.excess, s.lower, s.upper), cost, u, absorb, deg1, valid, numbers=numbers)[:, 0]


class ChainSystem(NamedTuple):
    """The absorbing chain of the 2(n-1) chain rows (chain a then chain b) seen from one start, each row
    in its own scale (divided by exp(``scaled.top``)); isolated vertices eliminated exactly.

    scaled: the row quantities of docs/THEORY.md §3.1, fields (2, n-1); own, other (2, n-1): each row's rate
    into a_n and into b_n; absorb (2(n-1),): into either; u (2(n-1), 2): weight on each degree-1 and
    degree-2 transient vertex; deg1 (2(n-1),): static, the rows of a degree-1 vertex (a_1, b_1).  Floats, or
    ``gradflow._extended.Extended`` numbers (``numbers=EXTENDED``).
    """

    scaled: _Scaled
    own: jnp.ndarray
    other: jnp.ndarray
    absorb: jnp.ndarray
    u: jnp.ndarray
    deg1: np.ndarray


def _flat(x, n: int, numbers: Numbers = FLOAT):
    """(2, n-1) (or broadcastable) -> (2(n-1),): chain a then chain b."""
    return numbers.apply(lambda v: jnp.broadcast_to(v, (2, n - 1)).reshape(-1), x)


def chain_system(theta: Theta, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT) -> ChainSystem:
    """The ``ChainSystem`` of the policy's rows for one start (``start`` only matters for softmax).

    Args:
        theta: the attention scores.
        n: the chain length.
        model: the model.
        start (int | jax.Array): the start position i of a_i (1..n-1).
        numbers: float64 (``FLOAT``) or ``EXTENDED`` (the fallback: no underflow at any logit gap).

    Returns:
        The ``ChainSystem`` (scaled rows, absorption and low-rank parts) of the 2(n-1) chain rows.
    """
    return _system_of_rows(row_logits(row_scores(theta, n, model, start=start), n, model), n, numbers)


def _system_of_rows(rows: RowLogits, n: int, numbers: Numbers = FLOAT) -> ChainSystem:
    """The ``ChainSystem`` of the chain rows' logits ``rows`` (``chain_system``)."""
    s = _scale_rows(rows, numbers)  # fields (2, n-1)
    where, apply = numbers.where, numbers.apply
    last = np.arange(n - 1) == n - 2
    absorb = where(last, numbers.add(s.far1, s.to_own), numbers.scale(s.far1, 2.0))
    far1, to_own = (apply(lambda v: jnp.broadcast_to(v, (2, n - 1)), x) for x in (s.far1, s.to_own))
    row = lambda x, i: apply(lambda v: v[i], x)
    own = numbers.stack([where(last, row(to_own, 0), row(far1, 0)), row(far1, 1)])  # into a_n
    other = numbers.stack([row(far1, 0), where(last, row(to_own, 1), row(far1, 1))])  # into b_n
    u = numbers.stack([_flat(s.far1, n, numbers), _flat(s.far2, n, numbers)], -1)
    return ChainSystem(s, own, other, _flat(absorb, n, numbers), u, np.tile(np.arange(1, n) == 1, 2))


def chain_solve(system: ChainSystem, rhs, signed: bool = False, numbers: Numbers = FLOAT) -> jnp.ndarray:
    """x = (I - Q)^{-1} rhs on the chain rows, by the positive Woodbury solve of ``gradflow._linalg``.

    Args:
        system: the chain rows (``chain_system``).
        rhs (jax.Array): right-hand sides of shape (2(n-1), k), in the rows' scale.
        signed: right-hand sides of either sign, solved by their two positive parts.
        numbers: the numbers of ``system`` and ``rhs`` (``chain_system``).

    Returns:
        x of shape (2(n-1), k); NaN where float64 could not hold the elimination (``FLOAT``).
    """
    return _woodbury(_chain_matrix(system, numbers), rhs, system.u, system.absorb, system.deg1, signed=signed, numbers=numbers)


def chain_solve_extended(system: ChainSystem, rhs: Extended) -> Extended:
    """``chain_solve`` of an ``EXTENDED`` system for right-hand sides of either sign, x as an ``Extended`` (a
    solution that feeds another solve keeps its digits: ``gradflow.noise``)."""
    return woodbury_extended(*_chain_matrix(system, EXTENDED), rhs, system.u, system.absorb, system.deg1)


def _chain_matrix(system: ChainSystem, numbers: Numbers) -> tuple:
    """(excess, lower, upper) of the tridiagonal T, flat over the 2(n-1) chain rows."""
    n = system.deg1.shape[0] // 2 + 1
    s = system.scaled
    return tuple(_flat(x, n, numbers) for x in (s.excess, s.lower, s.upper))


class Deviation(NamedTuple):
    """e = h - 1/2 of a softmax start's chain, by its mirror-symmetric part (docs/THEORY.md §3.6): every row but the
    start's is the row it would be with no start (``row_scores(start=None)``), so e = e_sym + rho G(., a_start), with
    e_sym the deviation of the chain whose start row is that row too (e_sym(b_i) = -e_sym(a_i), 0 at the isolated
    vertices: the far jumps fold away and e_sym solves chain a's tridiagonal with the last row's c_succ / 2, as linear
    attention's), rho = E_P[e_sym(next)] - E_Psym[e_sym(next)] from the start row's local couplings alone (the far
    pairs cancel exactly), and G(., a_start) >= 0 its expected visits to the start (a positive solve).  Both parts keep
    their digits where h - 1/2 read from h or from a signed solve (its parts ~1/2, or ~G r at each last row) cancels.

    e_sym (n-1,): chain a; rho (); diag (): the start row's weight in its scale (the right-hand side diag 1_start
    of G's solve), in the system's numbers."""

    e_sym: Any
    rho: Any
    diag: Any


def softmax_deviation(theta: Theta, n: int, model: ModelSpec, system: ChainSystem, start, numbers: Numbers = FLOAT) -> Deviation:
    """The ``Deviation`` of the softmax chain ``system`` seen from ``start`` (``chain_system``), in its numbers."""
    apply, add, mul = numbers.apply, numbers.add, numbers.mul
    sym = _scale_rows(row_logits(row_scores(theta, n, model), n, model), numbers)
    chain_a = lambda x: apply(lambda v: jnp.broadcast_to(v, (2, n - 1))[0], x)
    t = tuple(chain_a(x) for x in (sym.excess, sym.lower, sym.upper))
    rhs = apply(lambda v: v[:, None], chain_a(sym.rhs_e))
    if numbers is EXTENDED:
        e_sym = apply(lambda v: v[:, 0], solve_extended(*t, rhs))
    else:
        e_sym = _tridiagonal(t, rhs, numbers)[:, 0]
    padded = numbers.concatenate([numbers.zeros((1,)), e_sym, numbers.zeros((1,))], 0)
    succ, pred = apply(lambda v: v[start + 1], padded), apply(lambda v: v[start - 1], padded)

    def mean_next(rows):
        """The start row's E[e_sym(next)] = (c_succ e_sym(succ) + c_pred e_sym(pred) + c_terminal / 2) / diag, and diag."""
        at = lambda x: apply(lambda v: jnp.broadcast_to(v, (2, n - 1))[0, start - 1], x)
        lower, upper = at(rows.lower), at(rows.upper)
        diag = add(at(rows.excess), add(signed_magnitude(numbers, lower), signed_magnitude(numbers, upper)))
        return numbers.div(add(add(mul(upper, succ), mul(lower, pred)), at(rows.rhs_e)), diag), diag

    (mean, diag), (mean_sym, _) = mean_next(system.scaled), mean_next(sym)
    return Deviation(e_sym, add(mean, numbers.scale(mean_sym, -1.0)), diag)


def _softmax_probabilities(theta: Theta, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT):
    """(h, q, e) at the start a_start (softmax): one 2(n-1)-row positive Woodbury solve with three columns (h, q and
    the expected visits to the start), e = h - 1/2 from its mirror-symmetric part (``softmax_deviation``).  With
    isolated vertices the derivatives through their return logit are ``_detour_split``'s."""
    rows = row_logits(row_scores(theta, n, model, start=start), n, model)
    if model.n_isolated and n > 2:
        return _detour_split(n, numbers is EXTENDED, theta, model, start, rows.g_iso)
    return _softmax_solve(theta, n, model, start, rows, numbers)[0]


def _softmax_solve(theta: Theta, n: int, model: ModelSpec, start, rows: RowLogits, numbers: Numbers = FLOAT, detours=False):
    """((h, q, e) at a_start, aux) from the chain rows' logits ``rows``; aux is None, or with ``detours`` (isolated
    vertices, n > 2) D dh as a float: D the expected detours through the isolated vertices from a_start, dh the mean
    of h over the degree-1 vertices (terminals included) minus that over the degree-2 vertices, from e's symmetric part
    (``_detour_split``; their product in ``numbers``, either of which may leave float64's range)."""
    system = _system_of_rows(rows, n, numbers)
    deviation = softmax_deviation(theta, n, model, system, start, numbers)
    at_start = jnp.arange(2 * (n - 1)) == start - 1
    diag = numbers.apply(lambda v: jnp.broadcast_to(v, at_start.shape), deviation.diag)
    visits = numbers.where(at_start, diag, numbers.zeros(at_start.shape))
    columns = [_flat(system.own, n, numbers), _flat(system.other, n, numbers), visits]
    if detours:  # each row's weight into the detours
        columns.append(_flat(numbers.scale(numbers.exp(-system.scaled.top), float(model.n_isolated)), n, numbers))
    rhs = numbers.stack(columns, -1)
    x = chain_solve_extended(system, rhs) if numbers is EXTENDED else chain_solve(system, rhs)
    at = lambda i, j: numbers.apply(lambda v: v[i, j], x)
    e_start = numbers.apply(lambda v: v[start - 1], deviation.e_sym)
    e = numbers.to_float(numbers.add(e_start, numbers.mul(deviation.rho, at(start - 1, 2))))
    outcome = (numbers.to_float(at(start - 1, 0)), numbers.to_float(at(start - 1, 1)), e)
    if not detours:
        return outcome, None
    # e(a_i) + e(b_i) = rho (G(a_i) + G(b_i)): e_sym is antisymmetric and the terminals' +-1/2 cancel
    visits = numbers.apply(lambda v: v[:, 2], x)
    pair = numbers.mul(deviation.rho, numbers.apply(lambda v: v[: n - 1] + v[n - 1 :], visits))
    first, rest = numbers.apply(lambda v: v[0], pair), numbers.total(numbers.apply(lambda v: v[1:], pair))
    per_vertex = numbers.div(rest, numbers.of(jnp.asarray(2.0 * (n - 2))))  # divided, as it was in float64
    dh = numbers.add(numbers.scale(first, 0.25), numbers.scale(per_vertex, -1.0))
    return outcome, numbers.to_float(numbers.mul(at(start - 1, 3), dh))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _detour_split(n: int, extended: bool, theta: Theta, model: ModelSpec, start, g_iso):
    """(h, q, e) at a_start (softmax, isolated vertices), whose derivative through g_iso (the isolated vertices' return
    logit) is exact.  A detour through the isolated vertices returns to a degree-1 chain vertex (terminals included)
    with probability f1 = 2 / (2 + (n-2) e^{g_iso}), else to a degree-2 one, uniformly within each class, so
        dh(a_s)/dg_iso = D(a_s) (mean h over degree 1 - mean h over degree 2) df1/dg_iso
    with D the expected detours from a_s (a positive solve) and the difference of means from e's symmetric part (the
    means are 1/2 up to it); differentiating the solve instead took that difference of two numbers near 1/2 and kept
    only their round-off (m's gamma and delta components were 1e-53 where they are 7e-64 and 4e-100)."""
    numbers = EXTENDED if extended else FLOAT  # a flag: a Numbers tuple is rebuilt as a non-differentiated argument
    return _softmax_solve(theta, n, model, start, _with_g_iso(theta, n, model, start, g_iso), numbers, detours=True)[0]


def _with_g_iso(theta: Theta, n: int, model: ModelSpec, start, g_iso) -> RowLogits:
    return row_logits(row_scores(theta, n, model, start=start), n, model)._replace(g_iso=g_iso)


@_detour_split.defjvp
def _detour_split_jvp(n, extended, primals, tangents):
    numbers = EXTENDED if extended else FLOAT
    theta, model, start, g_iso = primals
    d_theta, d_model, _, d_g_iso = tangents
    held = lambda th, md: _softmax_solve(th, n, md, start, _with_g_iso(th, n, md, start, g_iso), numbers, detours=True)
    (outcome, detours_dh), (d_outcome, _) = jax.jvp(held, (theta, model), (d_theta, d_model))
    f1 = lambda g: 2.0 / (2.0 + (n - 2) * jnp.exp(g))
    d_f1 = jax.jvp(f1, (g_iso,), (d_g_iso,))[1]
    d_h = detours_dh * d_f1
    return outcome, (d_outcome[0] + d_h, d_outcome[1] - d_h, d_outcome[2] + d_h)


def _softmax_length(theta: Theta, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT):
    system = chain_system(theta, n, model, start, numbers)
    cost = numbers.apply(lambda v: v[:, None], _flat(system.scaled.cost, n, numbers))
    return chain_solve(system, cost, numbers=numbers)[start - 1, 0]


def _require_unpadded(task, model: ModelSpec, what: str) -> None:
    if isinstance(task, PaddedTask) and model.attention != "linear":
        raise ValueError(f"{what}: a PaddedTask (n as data) is solved for linear attention only")


def _softmax_per_start(fn, theta, n, model):
    return jax.vmap(lambda position: fn(theta, n, model, position))(jnp.arange(1, n))


def numbers_of(model: ModelSpec) -> Numbers:
    """The numbers the closed form's solves run in (``ModelSpec.numbers``): ``FLOAT`` or ``EXTENDED``, a static choice."""
    return EXTENDED if model.numbers == "extended" else FLOAT


def _has_nan(tree) -> bool:
    return any(bool(np.isnan(np.asarray(leaf)).any()) for leaf in jax.tree.leaves(tree))


def finite_or_extended(evaluate: Callable[[ModelSpec], Any], model: ModelSpec):
    """evaluate(model); where that is eager (no JAX trace), in float64 numbers and holds a NaN (a solve left
    float64's range), evaluate(model with numbers="extended") instead (``model.with_extended_numbers``; a cap:
    no fallback): its own compiled program, built only then.

    Under a JAX trace (a user's jit, vmap or grad) nothing can be checked: ``evaluate(model)`` is returned as
    it is, and such users pick ``ModelSpec(numbers="extended")`` themselves.
    """
    out = evaluate(model)
    extended = with_extended_numbers(model)
    leaves = jax.tree.leaves(out)
    if extended is None or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves) or not _has_nan(leaves):
        return out
    return evaluate(extended)


def _extended_on_nan(quantity: Callable) -> Callable:
    """``quantity(theta, task, model)`` through ``finite_or_extended``."""

    @functools.wraps(quantity)
    def eager(theta: Theta, task: ChainTask, model: ModelSpec):
        return finite_or_extended(lambda m: quantity(theta, task, m), model)

    return eager


def _outcome_of(theta: Theta, model: ModelSpec, numbers: Numbers, n, rows: int | None):
    """(P(own), P(other)) per start distance in ``numbers`` (``_outcome_per_start``)."""
    if model.attention == "linear":
        own, other = own_and_other(*_linear_probabilities(theta, n, model, rows, numbers))
        return by_distance(own, n, rows), by_distance(other, n, rows)
    own, other = own_and_other(*_softmax_per_start(functools.partial(_softmax_probabilities, numbers=numbers), theta, n, model))
    return by_distance(own), by_distance(other)


def _outcome_per_start(theta: Theta, task: ChainTask, model: ModelSpec):
    """(P(own), P(other)) per start distance, each read from the representation that keeps its digits.

    From e = h - 1/2 while |e| <= 1/4 (so J - 1/2 and its gradient keep their leading digits on a plateau), from q
    when e > 1/4 (1 - J near 1), from h when e < -1/4 (``gradflow.model.own_and_other``).
    V trained (``model.values == "trained"``): ``gradflow.two_matrix``.  In the model's numbers (``numbers_of``).
    """
    _require_closed_form(model)
    if model.values == "trained":
        return two_matrix.outcome_per_start(theta, task, model)
    _require_unpadded(task, model, "expected_reward")
    n, rows = layout(task)
    return _outcome_of(theta, model, numbers_of(model), n, rows)


# --------------------------------------------------------------------------------------------------
# Public quantities
# --------------------------------------------------------------------------------------------------


@_extended_on_nan
@eqx.filter_jit
@_capped_when_set(capped.success_per_start)
def same_side_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """h[d-1] = P(the walk from a_{n-d} is absorbed at its own terminal a_n before b_n)."""
    return _outcome_per_start(theta, task, model)[0]


@_extended_on_nan
@eqx.filter_jit
@_capped_when_set(capped.expected_reward)
def expected_reward(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """J(theta) = sum_d p[d-1] h[d-1] = 1 - sum_d p[d-1] q[d-1]; the loss is 1 - J (``expected_loss``
    keeps its digits).  Read from the loss when J > 1/2, so J lies in [0, 1] at any start_probs."""
    own, other = _outcome_per_start(theta, task, model)[:2]
    loss = jnp.sum(task.start_probs * other)
    # read J as 1 - loss above 1/2: stays in [0, 1] even when start_probs sums to 1 + ulp
    return jnp.where(loss < 0.5, 1.0 - loss, jnp.sum(task.start_probs * own))


@_extended_on_nan
@eqx.filter_jit
@_capped_when_set(capped.expected_loss)
def expected_loss(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """1 - J = sum_d p[d-1] P(the walk from a_{n-d} ends at the other terminal), to relative accuracy
    even where J rounds to 1 (capped models: ``gradflow.capped.expected_loss``, a sum of positive terms)."""
    return jnp.sum(task.start_probs * _outcome_per_start(theta, task, model)[1])


@_extended_on_nan
@eqx.filter_jit
@_capped_when_set(capped.length_per_start)
def length_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """L[d-1] = expected number of generated tokens from a_{n-d} until the first terminal (>= d).

    Self-loops (mask_self=False) count as tokens.  inf when above 1e300 (not representable).
    V trained: ``gradflow.two_matrix.length_per_start``.
    """
    _require_closed_form(model)
    _require_unpadded(task, model, "length_per_start")
    n, rows = layout(task)
    if model.values == "trained":
        lengths = two_matrix.length_per_start(theta, task, model)
    else:
        lengths = _lengths_of(theta, model, numbers_of(model), n, rows)
    return jnp.where(lengths > LENGTH_LIMIT, jnp.inf, lengths)


def _lengths_of(theta: Theta, model: ModelSpec, numbers: Numbers, n, rows: int | None):
    """``length_per_start`` in ``numbers``."""
    if model.attention == "linear":
        return by_distance(_linear_length(theta, n, model, rows, numbers), n, rows)
    return by_distance(_softmax_per_start(functools.partial(_softmax_length, numbers=numbers), theta, n, model))


@_extended_on_nan
@eqx.filter_jit
@_capped_when_set(capped.expected_length)
def expected_length(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """E[tokens until the first terminal], start-weighted: sum_d p[d-1] L[d-1] (inf above 1e300)."""
    lengths = length_per_start(theta, task, model)
    total = jnp.sum(jnp.where(task.start_probs > 0, task.start_probs * lengths, 0.0))
    return jnp.where(total > LENGTH_LIMIT, jnp.inf, total)


@eqx.filter_jit
@_capped_when_set(capped.traversal_per_start)
def traversal_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """T[d-1] = prod_{i=n-d}^{n-1} P(a_i -> a_{i+1}): the exact forward path, no detour, no self-loop (V trained:
    ``gradflow.two_matrix.traversal_per_start``)."""
    _require_closed_form(model)
    _require_unpadded(task, model, "traversal_per_start")
    if model.values == "trained":
        return two_matrix.traversal_per_start(theta, task, model)
    n, rows = layout(task)

    def log_forward(position, positions=None):
        rows = chain_a_logits(row_logits(row_scores(theta, n, model, start=position), n, model, positions))
        return rows.succ - row_log_total(rows, include_self=self_loops(model))["total"]

    def log_path_from(position):
        return jnp.cumsum(log_forward(position)[::-1])[::-1]  # entry i-1: sum over positions i..n-1

    if model.attention == "linear":  # every kind of row computed once (``distinct_rows``)
        if rows is None:
            positions, kind = distinct_rows(n)
            per_row = log_forward(None, positions)[kind]
        else:
            positions, kind, valid = distinct_rows_traced(n, rows)
            per_row = jnp.where(valid, log_forward(None, positions)[kind], 0.0)
        return jnp.exp(by_distance(jnp.cumsum(per_row[::-1])[::-1], n, rows))
    at_start = lambda position: log_path_from(position)[position - 1]
    return jnp.exp(by_distance(jax.vmap(at_start)(jnp.arange(1, n))))


@eqx.filter_jit
@_capped_when_set(capped.traversal_probability)
def traversal_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """P(the generated path is exactly the forward path to the terminal), start-weighted."""
    return jnp.sum(task.start_probs * traversal_per_start(theta, task, model))
