"""Finite rollouts: the reward and its read-outs with at most ``max_len`` generated tokens (docs/THEORY.md §7).

With a cap of T tokens a rollout that writes no terminal within T tokens earns 0, so the success
probability of a start is a T-step absorption probability.  On the transient vertices (chain
vertices a_1..a_{n-1}, b_1..b_{n-1} and the isolated vertices) this module runs

    f_{k+1} = P f_k  (a_n valued 1),   g_{k+1} = P g_k  (b_n valued 1),   s_{k+1} = P s_k  (terminals 0),

from f_0 = g_0 = 0, s_0 = 1: f_k(u) = P(a_n written within k tokens | at u), g_k the same for b_n,
s_k(u) = P(no terminal within k tokens) = P(L > k), L the number of tokens up to and including the
first terminal.  So, per start u = a_{n-d}:

    success   f_T(u)                 (own terminal within the cap: the reward)
    reach     f_T(u) + g_T(u)        (any terminal within the cap)
    length    sum_{k<T} s_k(u) = E[min(L, T)]
    traversal prod_{i=n-d}^{n-1} P(a_i -> a_{i+1}) if d <= T, else 0  (the exact forward path)

Each step applies P as the structured operator of ``gradflow.model``, never as a matrix: row u
gives the three local targets (successor, itself, predecessor on its own chain) their own weights
and every other vertex v the far weight exp(gamma_u deg(v)) (1 for an isolated vertex), so

    (P v)(u) = [w_succ v(succ) + w_self v(u) + w_pred v(pred)
                + e1 (sum of v over the non-local degree-1 vertices)
                + e2 (sum of v over the non-local degree-2 vertices) + e0 m v(iso)] / Z(u),

the non-local sums being prefix + suffix sums along the row's own chain plus the other chain's
total: O(n) per step, O(n T) for the whole recursion, and every probability a sum of positive terms
(no cancellation).  Row weights are exponentials of the logits minus the row's largest logit, so any
|theta| / tau is safe.  The isolated vertices are interchangeable, so they carry one shared value.

Linear attention: every row of both chains sees the same numbers, so one recursion serves every
start.  Softmax attention: the start row attends to its own token with eta, so there is one
recursion per start (vmapped over starts: O(n^2 T)).  Both chains are carried in full because with a
cap P(own) + P(other) < 1 (the uncapped a/b symmetry h(b_i) = 1 - h(a_i) no longer holds).

Gradients: the recursion is one ``lax.scan`` whose body is rematerialised (``jax.checkpoint``), so
reverse mode stores only the carry of each step, 3 * (2(n-1) + 1) + 2(n-1) floats, i.e. about
8 n T floats in all (per start for softmax), and recomputes each step's intermediates once in the
backward pass (about twice the forward cost).  Forward mode (jvp, jacfwd) stores nothing extra;
every order of derivative works (jax.hessian included).

V trained (``ModelSpec(values="trained")``, docs/THEORY.md §10): the rows depend on the start (a start
row and three far classes: chain starts, interior vertices, terminals), so there is one recursion per
start over ``two_matrix.start_logits``, each step O(n) by the same prefix and suffix sums per class,
the start left out of its class with its own weight.

n and the cap as data (``gradflow.flow.shared_layout``, linear attention with fixed V): with a ``PaddedTask`` the
recursions run in the bucket's rows (the slots past n - 1 copies of row n - 1, never read: values past position n
are zeros, the terminal values sit at position n, per-start entries past d = n - 1 are zeros); with a
``LaidOutModel`` the cap is traced and the scan runs the model's ``cap_size`` steps, a ``lax.cond`` keeping the
carry past the cap (``_capped_scan``).

All public functions take ``(theta, task, model)`` and need ``model.max_len`` set (or the keyword
``max_len``, which wins when given).  Per-start arrays are indexed by start distance d = 1..n-1
(entry d-1); the scalar versions weight them by ``task.start_probs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import two_matrix
from gradflow._checks import check_int
from gradflow.model import ModelSpec, RowScores, Theta, is_data, logit_when, row_logits, row_scores
from gradflow.task import ChainTask, by_distance, layout

__all__ = [
    "CappedPerStart",
    "per_start",
    "success_per_start",
    "reach_per_start",
    "length_per_start",
    "traversal_per_start",
    "expected_reward",
    "reach_probability",
    "expected_length",
    "traversal_probability",
    "failure_per_start",
    "expected_loss",
]


class CappedPerStart(NamedTuple):
    """The capped read-outs per start distance d = 1..n-1 (entry d-1), each shape (n-1,).

    failure = 1 - success, computed as P(other terminal first) + P(no terminal within the cap), a sum
    of positive terms: accurate where success rounds to 1.
    """

    success: jnp.ndarray
    reach: jnp.ndarray
    length: jnp.ndarray
    traversal: jnp.ndarray
    failure: jnp.ndarray


class _Rows(NamedTuple):
    """Row weights (divided by exp of the row's largest logit) of the chain rows, shape (2, rows),
    and of the isolated row (scalars): targets succ/self/pred, far weights e1 (a degree-1 vertex),
    e2 (a degree-2 vertex), e0 (the m isolated vertices together), normaliser z, and log P(forward);
    the isolated row's weights of a degree-1 and a degree-2 vertex, iso0 (the other isolated
    vertices together) and its normaliser."""

    succ: jnp.ndarray
    self_: jnp.ndarray
    pred: jnp.ndarray
    e1: jnp.ndarray
    e2: jnp.ndarray
    e0: jnp.ndarray
    z: jnp.ndarray
    log_forward: jnp.ndarray
    iso1: jnp.ndarray
    iso2: jnp.ndarray
    iso0: jnp.ndarray
    iso_z: jnp.ndarray


def _resolve_cap(model: ModelSpec, max_len: int | None) -> tuple:
    """(cap, steps): the cap on tokens and how many steps the recursions run.  A Python cap runs itself; a traced
    one (``LaidOutModel``) runs the model's ``cap_size``, the steps past the cap keeping their values."""
    cap = model.max_len if max_len is None else max_len
    if cap is None:
        raise ValueError("max_len must be set (ModelSpec(max_len=...) or the max_len keyword) for capped quantities")
    if is_data(cap):
        return cap, model.cap_size
    cap = check_int("max_len", cap, 1)
    return cap, cap


def _require_closed_form(model: ModelSpec) -> None:
    if model.context != "prompt":
        raise ValueError(
            f"context must be 'prompt' for closed-form quantities (got {model.context!r}); "
            "the 'history' context is not Markov and is only available in gradflow.sampling"
        )


def _weight(logits: list, top) -> jnp.ndarray:
    """exp(logit - top) of a logit ``logit_when`` kept (-inf where absent: an exact 0 with a zero derivative), 0 where
    it left none."""
    return jnp.exp(logits[0] - top) if logits else jnp.zeros_like(top)


def _rows(scores: RowScores, n, model: ModelSpec, rows: int | None = None) -> _Rows:
    """The logits of ``gradflow.model.row_logits`` (docs/THEORY.md §2.2), exponentiated after subtracting each
    row's largest logit (a constant that cancels: no gradient).  ``rows``: a bucket's row slots (n traced,
    ``gradflow.task.layout``), the slots past n - 1 copies of row n - 1 (finite, never read); None: n - 1 rows."""
    positions = np.arange(1, n) if rows is None else jnp.minimum(jnp.arange(1, rows + 1), n - 1)
    shape = (2, len(positions))
    logits = row_logits(scores, n, model, positions)
    l_succ, l_self, l_pred, g = (jnp.broadcast_to(x, shape) for x in (logits.succ, logits.self_, logits.pred, logits.g))
    m, has_self, has_pred = logits.n_isolated, logits.self_present, logits.has_pred
    count1, count2 = logits.far1, logits.far2  # non-local vertices of each degree
    l_far2 = 2.0 * g
    self_logit, iso_logit = logit_when(has_self, l_self), logit_when(m > 0, jnp.zeros(shape))
    candidates = [l_succ, jnp.where(has_pred, l_pred, -jnp.inf), g, jnp.where(count2 > 0, l_far2, -jnp.inf)]
    top = jax.lax.stop_gradient(jnp.max(jnp.stack(candidates + self_logit + iso_logit), axis=0))
    w_succ, w_self = jnp.exp(l_succ - top), _weight(self_logit, top)
    w_pred = jnp.exp(jnp.where(has_pred, l_pred - top, -jnp.inf))
    e1 = jnp.exp(g - top)
    e2 = jnp.exp(jnp.where(count2 > 0, l_far2 - top, -jnp.inf))
    e0 = m * _weight(iso_logit, top)
    z = w_succ + w_self + w_pred + count1 * e1 + count2 * e2 + e0
    log_forward = (l_succ - top) - jnp.log(z)

    # the isolated row: 4 chain ends, 2n - 4 interior vertices, the other isolated vertices (itself unless masked)
    y, interior = scores.isolated, n >= 3
    m_iso = m - 1 + (has_self.astype(float) if is_data(has_self) else int(has_self))
    iso_far2, iso_other = logit_when(interior, 2.0 * y), logit_when(m_iso > 0, jnp.zeros_like(y))
    iso_top = jax.lax.stop_gradient(jnp.max(jnp.stack([y] + iso_far2 + iso_other)))
    iso1, iso2, iso0 = jnp.exp(y - iso_top), _weight(iso_far2, iso_top), m_iso * _weight(iso_other, iso_top)
    iso_z = 4 * iso1 + (2 * n - 4) * iso2 + iso0
    return _Rows(w_succ, w_self, w_pred, e1, e2, e0, z, log_forward, iso1, iso2, iso0, iso_z)


def _apply(rows: _Rows, values: jnp.ndarray, iso: jnp.ndarray, n, counted: bool):
    """One step v -> P v for K value vectors at once.

    values (K, 2, rows + 1): chain a / chain b at positions 1..rows + 1 (``_with_terminals``: the terminal values at
    position n, zeros past it); iso (K,): the shared value of the isolated vertices (``counted``: the isolated terms
    are in the program).  Returns the new (K, 2, rows) chain values and (K,) isolated value.  Every term is a product
    of non-negative numbers.
    """
    width = values.shape[-1] - 1
    pos = jnp.arange(1, width + 1)
    position = jnp.arange(1, width + 2)
    degree2 = ((position >= 2) & (position <= n - 1)).astype(values.dtype)
    v2 = values * degree2
    prefix = jnp.cumsum(v2, axis=-1)  # prefix[j-1] = sum over positions <= j
    suffix = jnp.flip(jnp.cumsum(jnp.flip(v2, -1), axis=-1), -1)  # suffix[j-1] = sum over positions >= j
    left = jnp.pad(prefix, ((0, 0), (0, 0), (2, 0)))[..., :width]  # row i: positions <= i-2
    right = jnp.pad(suffix, ((0, 0), (0, 0), (0, 3)))[..., 2 : width + 2]  # row i: positions >= i+2
    at_n = jax.lax.dynamic_slice_in_dim(values, n - 1, 1, axis=-1)  # the terminals' values
    own1 = values[..., :1] * (pos >= 3) + at_n * (pos <= n - 2)
    total1 = values[..., 0] + at_n[..., 0]  # (K, 2)
    total2 = suffix[..., 0]
    other1 = jnp.flip(total1, -1)[..., None]
    other2 = jnp.flip(total2, -1)[..., None]
    pred_values = jnp.pad(values, ((0, 0), (0, 0), (1, 0)))[..., :width]
    numerator = (
        rows.succ * values[..., 1:]
        + rows.self_ * values[..., :width]
        + rows.pred * pred_values
        + rows.e1 * (own1 + other1)
        + rows.e2 * (left + right + other2)
    )
    if counted:
        numerator = numerator + rows.e0 * iso[:, None, None]
    chain = numerator / rows.z
    if not counted:
        return chain, iso
    iso_new = (rows.iso1 * jnp.sum(total1, -1) + rows.iso2 * jnp.sum(total2, -1) + rows.iso0 * iso) / rows.iso_z
    return chain, iso_new


# terminal values of the three recursions (f: a_n, g: b_n, s: none), shape (3, 2, 1)
def _terminal_values():
    return jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[:, :, None]


def _with_terminals(chain: jnp.ndarray, n) -> jnp.ndarray:
    """The recursions' chain values (3, 2, rows) at positions 1..rows + 1: their own before n, the terminal values at
    n, zeros past it (a bucket's slots)."""
    position = jnp.arange(1, chain.shape[-1] + 2)
    padded = jnp.pad(chain, ((0, 0), (0, 0), (0, 1)))
    return jnp.where(position < n, padded, jnp.where(position == n, _terminal_values(), 0.0))


def _capped_scan(step: Callable, carry, cap, steps: int):
    """``step`` applied ``cap`` times to ``carry``: a scan of ``steps`` (= cap when the cap is a Python int; its
    bucket when traced, the steps past it keeping the carry), each step rematerialised in reverse mode
    (``jax.checkpoint``: only the carries are stored)."""
    step = jax.checkpoint(step, prevent_cse=False)
    if not is_data(cap):
        return jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=cap)[0]

    def gated(c, k):
        return jax.lax.cond(k < cap, step, lambda c: c, c), None

    return jax.lax.scan(gated, carry, jnp.arange(steps))[0]


def _recursion(rows: _Rows, n, counted: bool, cap, steps: int):
    """Run the three recursions for ``cap`` steps; returns f_T, g_T, s_T and sum_{k<T} s_k, each (2, rows)."""
    width = rows.z.shape[-1]
    chain0 = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0])[:, None, None], (3, 2, width))
    iso0 = jnp.array([0.0, 0.0, 1.0])

    def step(carry):
        chain, iso, length = carry
        chain, iso = _apply(rows, _with_terminals(chain, n), iso, n, counted)
        return chain, iso, length + carry[0][2]

    chain, _, length = _capped_scan(step, (chain0, iso0, jnp.zeros((2, width))), cap, steps)
    return chain[0], chain[1], chain[2], length


def _per_start_from_rows(rows: _Rows, n, model: ModelSpec, cap, steps: int) -> CappedPerStart:
    """All four read-outs of every chain-a row (index i-1 for a_i), shape (rows,) each."""
    counted = is_data(model.n_isolated) or model.n_isolated > 0
    f, g, s, length = _recursion(rows, n, counted, cap, steps)
    position = jnp.arange(1, rows.z.shape[-1] + 1)
    log_forward = jnp.where(position <= n - 1, rows.log_forward[0], 0.0)  # a bucket's slots past n - 1: nothing
    log_path = jnp.cumsum(log_forward[::-1])[::-1]  # entry i-1: log prod over positions i..n-1
    traversal = jnp.where(n - position <= cap, jnp.exp(log_path), 0.0)
    return CappedPerStart(f[0], f[0] + g[0], length[0], traversal, g[0] + s[0])


# --------------------------------------------------------------------------------------------------
# V trained (docs/THEORY.md §10): one recursion per start over the start's rows
# --------------------------------------------------------------------------------------------------


class _StartRows(NamedTuple):
    """Row weights of the trained-V model seen from one start, each row divided by exp of its largest
    logit: chain rows (2, n-1) for succ/self/pred, far (3, 2, n-1) for the far classes (chain starts,
    interior vertices, terminals), start (2, n-1) on the start where it is far, isolated (2, n-1) on each
    isolated vertex, z the rows' totals, log_forward; the isolated row (scalars): iso_far (3,), iso_start,
    iso_self (itself), iso_other (each other isolated vertex), iso_z."""

    succ: jnp.ndarray
    self_: jnp.ndarray
    pred: jnp.ndarray
    far: jnp.ndarray
    start: jnp.ndarray
    isolated: jnp.ndarray
    z: jnp.ndarray
    log_forward: jnp.ndarray
    iso_far: jnp.ndarray
    iso_start: jnp.ndarray
    iso_self: jnp.ndarray
    iso_other: jnp.ndarray
    iso_z: jnp.ndarray


def _start_rows(theta: Theta, n: int, model: ModelSpec, start) -> _StartRows:
    """``two_matrix.start_logits`` exponentiated in each row's scale (the row's largest present logit
    subtracted: a constant that cancels, no gradient); totals by ``_start_apply`` on ones."""
    logits = two_matrix.start_logits(theta, n, model, start)
    m = model.n_isolated
    shape = (2, n - 1)
    rows = lambda x: jnp.broadcast_to(x, (2 * (n - 1),)).reshape(shape)
    succ, self_, pred = rows(logits.succ), rows(logits.self_), rows(logits.pred)
    far = jnp.stack([rows(logits.chain_start), rows(logits.interior), rows(logits.terminal)])
    far_s = rows(jnp.where(logits.start_far, logits.start_class + logits.start_extra, -jnp.inf))
    # a far class sets the row's scale only where the row has members of it: a dominant empty class would
    # underflow every weight of the row (z = 0, log z = -inf at |theta|/tau ~ 1e4 with V trained)
    far_present = jnp.where(_far_counts(n, model, start) > 0, far, -jnp.inf)
    present = [succ, pred, far_s, *far_present] + ([jnp.zeros(shape)] if m else [])
    present += [] if model.mask_self else [self_]
    top = jax.lax.stop_gradient(jnp.max(jnp.stack(present), axis=0))
    self_w = jnp.zeros(shape) if model.mask_self else jnp.exp(self_ - top)
    isolated = jnp.exp(-top) if m else jnp.zeros(shape)

    iso_far = jnp.stack([logits.iso_start, logits.iso_interior, logits.iso_terminal])
    iso_s = logits.iso_start_class + logits.iso_start_extra
    m_other = max(m - 1, 0)  # the other isolated vertices
    iso_present = [iso_far[0], iso_far[2], iso_s] + ([iso_far[1]] if n >= 3 else []) + ([jnp.zeros(())] if m_other else [])
    iso_present += [] if model.mask_self else [logits.iso_self]
    iso_top = jax.lax.stop_gradient(jnp.max(jnp.stack(iso_present)))
    iso_self = jnp.zeros(()) if model.mask_self else jnp.exp(logits.iso_self - iso_top)
    weights = _StartRows(
        jnp.exp(succ - top), self_w, jnp.exp(pred - top), jnp.exp(far_present - top), jnp.exp(far_s - top), isolated,
        None, None, jnp.exp(iso_far - iso_top), jnp.exp(iso_s - iso_top), iso_self, jnp.exp(-iso_top), None,
    )  # fmt: skip
    (z,), (iso_z,) = _start_apply(weights, jnp.ones((1, 2, n)), jnp.ones(1), n, model, start)
    return weights._replace(z=z, log_forward=succ - top - jnp.log(z), iso_z=iso_z)


def _far_counts(n: int, model: ModelSpec, start) -> jnp.ndarray:
    """(3, 2, n-1): how many far members of each class (chain starts, interior vertices, terminals) each chain
    row has seen from ``start`` (``_start_apply`` with a unit weight on that class alone)."""

    def count(c):
        unit = _StartRows(*([jnp.zeros(())] * len(_StartRows._fields)))._replace(far=jnp.eye(3)[c][:, None, None])
        return _start_apply(unit, jnp.ones((1, 2, n)), jnp.zeros(1), n, model, start)[0][0]

    return jnp.stack([count(c) for c in range(3)])


def _start_apply(rows: _StartRows, values: jnp.ndarray, iso: jnp.ndarray, n: int, model: ModelSpec, start):
    """The unnormalised step v -> Z P v of the start's rows for K value vectors (``_apply``'s layout):
    values (K, 2, n) (terminal values last), iso (K,); returns (K, 2, n-1) and (K,).

    Far sums of each class run over the row's own chain by prefix and suffix sums (positions <= i-2 and
    >= i+2) plus the other chain's total, the start left out of its class (it has its own weight): every
    term a product of non-negative numbers.
    """
    position = np.arange(1, n + 1)
    classes = np.stack([position == 1, (position >= 2) & (position <= n - 1), position == n]).astype(float)  # (3, n)
    on_start = (jnp.arange(2)[:, None] == 0) & (jnp.asarray(position)[None, :] == start)  # (2, n)
    v_start = values[:, 0, start - 1]  # (K,)
    y = jnp.where(on_start, 0.0, values)[:, None] * classes[None, :, None, :]  # (K, 3, 2, n)
    prefix = jnp.cumsum(y, axis=-1)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(y, -1), axis=-1), -1)
    left = jnp.pad(prefix, ((0, 0), (0, 0), (0, 0), (2, 0)))[..., : n - 1]  # row i: positions <= i-2
    right = jnp.pad(suffix, ((0, 0), (0, 0), (0, 0), (0, 3)))[..., 2 : n + 1]  # row i: positions >= i+2
    totals = suffix[..., 0]  # (K, 3, 2)
    far = left + right + jnp.flip(totals, -1)[..., None]
    pred_values = jnp.pad(values, ((0, 0), (0, 0), (1, 0)))[..., : n - 1]
    m = model.n_isolated
    chain = (
        rows.succ * values[..., 1:]
        + rows.self_ * values[..., : n - 1]
        + rows.pred * pred_values
        + jnp.sum(rows.far * far, axis=1)
        + rows.start * v_start[:, None, None]
        + rows.isolated * m * iso[:, None, None]
    )
    iso_new = (
        jnp.sum(rows.iso_far * jnp.sum(totals, -1), -1)
        + rows.iso_start * v_start
        + (rows.iso_self + max(m - 1, 0) * rows.iso_other) * iso
    )
    return chain, iso_new


def _trained_at_start(theta: Theta, n: int, model: ModelSpec, cap, steps: int, start) -> CappedPerStart:
    """The read-outs of the start a_start of the trained-V model: the three recursions over its rows."""
    rows = _start_rows(theta, n, model, start)
    terminal = jnp.broadcast_to(_terminal_values(), (3, 2, 1))

    def step(carry):
        chain, iso, length = carry
        new_chain, new_iso = _start_apply(rows, jnp.concatenate([chain, terminal], axis=-1), iso, n, model, start)
        return new_chain / rows.z, new_iso / rows.iso_z if model.n_isolated else iso, length + chain[2, 0, start - 1]

    chain0 = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0])[:, None, None], (3, 2, n - 1))
    chain, _, length = _capped_scan(step, (chain0, jnp.array([0.0, 0.0, 1.0]), jnp.zeros(())), cap, steps)
    f, g, s = chain[:, 0, start - 1]
    log_path = jnp.sum(jnp.where(jnp.arange(1, n) >= start, rows.log_forward[0], 0.0))
    traversal = jnp.where(n - start <= cap, jnp.exp(log_path), 0.0)
    return CappedPerStart(f, f + g, length, traversal, g + s)


@eqx.filter_jit
def per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> CappedPerStart:
    """Success, reach, E[min(L, max_len)], exact traversal and failure per start distance d (entry d-1).

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        A ``CappedPerStart`` of arrays of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    _require_closed_form(model)
    cap, steps = _resolve_cap(model, max_len)
    n, rows = layout(task)
    if rows is not None and (model.attention != "linear" or model.values != "fixed"):
        raise ValueError("per_start: a PaddedTask (n as data) is solved for linear attention with fixed values only")
    if model.values == "trained":
        out = jax.vmap(lambda position: _trained_at_start(theta, n, model, cap, steps, position))(jnp.arange(1, n))
        return CappedPerStart(*(x[::-1] for x in out))
    if model.attention == "linear":
        out = _per_start_from_rows(_rows(row_scores(theta, n, model), n, model, rows), n, model, cap, steps)
        return CappedPerStart(*(by_distance(x, n, rows) for x in out))

    def at_start(position):
        rows = _rows(row_scores(theta, n, model, start=position), n, model)
        return CappedPerStart(*(x[position - 1] for x in _per_start_from_rows(rows, n, model, cap, steps)))

    out = jax.vmap(at_start)(jnp.arange(1, n))
    return CappedPerStart(*(x[::-1] for x in out))


def success_per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """P(the own terminal a_n is the first terminal and is written within max_len tokens), by d.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        An array of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return per_start(theta, task, model, max_len).success


def reach_per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """P(some terminal is written within max_len tokens), by d.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        An array of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return per_start(theta, task, model, max_len).reach


def length_per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """E[min(L, max_len)] by d: the expected number of generated tokens (self-loops count).

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        An array of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return per_start(theta, task, model, max_len).length


def traversal_per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """P(the generated path is exactly a_{n-d+1}, ..., a_n) by d; 0 when d > max_len.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        An array of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return per_start(theta, task, model, max_len).traversal


def _weighted(values: jnp.ndarray, task: ChainTask) -> jnp.ndarray:
    return jnp.sum(task.start_probs * values)


def expected_reward(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """J_T(theta) = sum_d p[d-1] success[d-1].

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        The scalar J_T.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return _weighted(success_per_start(theta, task, model, max_len), task)


def reach_probability(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """P(some terminal within the cap), start-weighted.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        A scalar.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return _weighted(reach_per_start(theta, task, model, max_len), task)


def expected_length(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """E[min(L, max_len)], start-weighted.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        A scalar.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return _weighted(length_per_start(theta, task, model, max_len), task)


def traversal_probability(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """P(exact forward path within the cap), start-weighted.

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        A scalar.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return _weighted(traversal_per_start(theta, task, model, max_len), task)


def failure_per_start(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """1 - success by d, as P(other terminal first within the cap) + P(no terminal within the cap).

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        An array of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return per_start(theta, task, model, max_len).failure


def expected_loss(theta: Theta, task: ChainTask, model: ModelSpec, max_len: int | None = None) -> jnp.ndarray:
    """1 - J_T, start-weighted, from ``failure_per_start`` (accurate where J_T rounds to 1).

    Args:
        theta: the attention scores.
        task: the chain task (its n and start probabilities).
        model: the model (softmax or linear attention, context "prompt").
        max_len: the cap on generated tokens (default: ``model.max_len``; the keyword wins when given).

    Returns:
        The scalar 1 - J_T.

    Raises:
        ValueError: no cap is set (neither ``model.max_len`` nor max_len) or it is not an integer >= 1,
            or ``model.context`` is not "prompt" (no closed form).
    """
    return _weighted(failure_per_start(theta, task, model, max_len), task)
