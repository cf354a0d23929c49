"""Policy-gradient noise in closed form: the REINFORCE covariance, the critical batch, the SGD diffusion.

docs/THEORY.md §8.  A rollout from start s writes s = v_0, v_1, ..., v_L; it earns R in {0, 1} and has
score S = sum_t psi(v_t, v_{t+1}), psi(u, v) = grad_theta log P_theta(u, v).  REINFORCE with a constant
baseline b steps on g = (R - b) S, whose mean is grad J for every b.  Per vertex u,

    h(u) = E[R | u],  m(u) = E[R S | u] (= grad h(u)),  M(u) = E[R S S^T | u],  F(u) = E[S S^T | u],

and, with terminals giving h = 1 (own) or 0 (other) and m = M = F = 0,

    m(u) = sum_v P(u,v) [psi h(v) + m(v)]
    M(u) = sum_v P(u,v) [psi psi^T h(v) + psi m(v)^T + m(v) psi^T + M(v)]
    F(u) = sum_v P(u,v) [psi psi^T + F(v)].

Each is the absorbing system of h, (I - Q) x = rhs, with a new right-hand side.  With the cap
``model.max_len = T`` the same recursions run T times from zero instead of being solved (docs/THEORY.md §8.4).

How the sums over v stay O(1) per row.  The logit of v in row u is l(u, v) = c(u, v) . s(u), with
s(u) = the row's effective (alpha, beta, gamma) scores (``gradflow.model.row_scores``: theta/tau for
linear attention, softmax-normalised weights for softmax) and c(u, v) in N^3 the prompt edges of each
kind that contain v (``gradflow.policy.edge_counts``, the one definition of the rows).  So
psi(u, v) = Js(u)^T (c(u, v) - cbar(u)) with Js(u) = d s(u) / d theta (3 x P, P = ``Theta.size()``) and
cbar(u) = sum_v P(u, v) c(u, v).  Row u puts weight exp(gamma_u deg v) on every vertex (the far
baseline) plus corrections on its three chain neighbours, so any sum sum_v P(u, v) f(c(u, v) - cbar(u)) g(v)
is nine terms: the far degree-1 and degree-2 classes (f fixed by the class, g summed over the class:
two global sums G1, G2), the isolated vertices, and the actual minus baseline weights of successor,
self and predecessor.  Weights are in each row's own scale (divided by its largest weight).

The solve.  Unknowns: the 2(n-1) non-terminal chain vertices; the isolated vertices (all alike, one
value) are transient states too and are eliminated exactly (their row: y(v) = exp(gamma_iso deg v) on
chain vertices, 1 on each other isolated vertex, itself unless masked).  Multiplied by the row's
weight, each system is the absorbing chain of ``gradflow.objective.chain_system`` (tridiagonal local
moves minus rank 2 far jumps, one column per degree class) with a new right-hand side, solved by the
positive GTH elimination and Woodbury of ``gradflow._linalg`` (``chain_solve``; a signed right-hand
side as the difference of its positive and negative parts, both solved with the positive guarantees).
O(n) per right-hand side, differentiable and vmappable.  Uncapped, two solves: [h | F] (1 + P^2 columns) and
M (P^2), M's m at every row the closed form's gradient of h (``_row_gradients``; the capped recursion solves m).
Linear attention: one chain serves every start; softmax: the start row has its own eta, one chain per start
(vmapped), as in ``gradflow.objective``.  The a/b mirror symmetry is not used (both chains are solved: a factor 2,
and the capped case needs both anyway).

V trained (``ModelSpec(values="trained")``, docs/THEORY.md §10): the coordinates are the ten numbers
(P = ``Theta.size("trained")``).  A chain row's logits are the far classes of ``gradflow.two_matrix``
(chain starts, interior vertices, terminals, isolated vertices) plus actual-minus-class corrections on
successor, self, predecessor and the start where it is far: twelve terms, each with its own score
gradient d logit / d theta (forward mode, so c(u, v) is that gradient and Js the identity); the isolated
row has seven.  Every solve is ``two_matrix.start_system``'s (tridiagonal minus rank 3, one per start).

Numbers (``ModelSpec.numbers``, docs/THEORY.md §8.4): float64, or the whole uncapped recursion (row weights and
normalisers, right-hand sides, solves and the values between them) in ``gradflow._extended`` numbers, written once
over ``Numbers``; the eager ``moments_per_start``, ``gradient_covariance``, ``batch_covariance`` and
``critical_batch`` fall back to them where float64 gave a NaN (``objective.finite_or_extended``).  Uncapped, m is
the closed form's gradient of h (``_grad_h``: the recursion's m solve cancels by dozens of digits from |theta|/tau of
a few hundred), and M's right-hand side takes m at every row from the closed form too (``_row_gradients``): with V
fixed M then equals a 2000-digit reference to about 1e-13 of its largest entry per start up to |theta|/tau = 1e4 (its
own signed solve does not cancel); with V trained M and F equal a 300-digit reference to about 2e-13 at 300 and 1e3
(c - cbar measured from each row's heaviest term, ``_mean_counts``; each far class summed with its corrections
first, ``_grouped_total``), and the settled mpmath chain beyond float64's range (linear at 1e3, softmax at 1e4) to
1e-13 and 3e-12.  At every row m is the derivative of h's reading that keeps its digits (``_own_readings``): e = h - 1/2
near 1/2 (``_deviations``), else h or -q.

Public names: ``moments_per_start``, ``gradient_covariance``, ``batch_covariance``, ``critical_batch``,
``critical_batch_along``, ``simulate_sgd`` (returns ``SGDPaths``), ``sample_scores``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import sampling, two_matrix
from gradflow._checks import check_choice, check_fraction, check_int, check_positive
from gradflow._extended import EXTENDED, FLOAT, Extended, Numbers
from gradflow._imports import diffrax  # a stand-in: diffrax is imported when first read
from gradflow._series import first_crossing
from gradflow.config import config_label
from gradflow.integrator import EulerMaruyama, integrate
from gradflow.model import ModelSpec, Theta, row_logits, row_scores
from gradflow.objective import (
    ChainSystem,
    chain_solve,
    chain_solve_extended,
    chain_system,
    expected_reward,
    finite_or_extended,
    numbers_of,
    same_side_probability,
    softmax_deviation,
)
from gradflow.policy import chain_targets, degree_counts
from gradflow.task import ChainTask

BASELINES = ("mean", "none")
BATCH_BASELINES = ("mean", "none", "leave_one_out")
ZERO_GRADIENT_RTOL = 1e-12  # critical_batch: |grad| below this times sqrt(trace Sigma) counts as 0 (inf)


# --------------------------------------------------------------------------------------------------
# Moments of the estimator per start
# --------------------------------------------------------------------------------------------------


class Moments(NamedTuple):
    """Per-start moments of the per-rollout REINFORCE terms, by start distance d (entry d-1).

    reward (n-1,): h = E[R]; grad (n-1, P): m = E[R S] (= grad h); reward_second (n-1, P, P):
    M = E[R S S^T]; score_second (n-1, P, P): F = E[S S^T].  Coordinates ``Theta.fields()``, P = ``Theta.size()``.
    """

    reward: jnp.ndarray
    grad: jnp.ndarray
    reward_second: jnp.ndarray
    score_second: jnp.ndarray


class _Rows(NamedTuple):
    """Everything the recursions need about one chain (one start for softmax); P = ``Theta.size()``.

    Weights are in each row's own scale (divided by exp of its largest logit, as in ``system``), in ``numbers``
    (float64, or ``gradflow._extended`` numbers: weights, normalisers and every value of the recursions); the
    edge counts, their means and the score Jacobians are floats."""

    weights: jnp.ndarray  # (9, 2, n-1): the nine row terms (see _chain_rows)
    counts: jnp.ndarray  # (9, 2, n-1, 3): c(u, v) of each term, minus its row's heaviest term's (``_mean_counts``)
    z: jnp.ndarray  # (2, n-1) row normaliser
    cbar: jnp.ndarray  # (2, n-1, 3): the mean of counts (so c - cbar = counts - cbar)
    jac: jnp.ndarray  # (2, n-1, 3, P) d s(u) / d theta
    iso_weights: jnp.ndarray  # (3,): degree-1, degree-2, other isolated vertex
    iso_counts: jnp.ndarray  # (3, 3), minus the heaviest term's
    iso_z: jnp.ndarray  # ()
    iso_cbar: jnp.ndarray  # (3,)
    iso_jac: jnp.ndarray  # (3, P)
    system: ChainSystem  # the absorbing chain of ``gradflow.objective`` (the matrix of every solve)
    start: object = None  # V trained: the start's position (its rows and terms depend on it)
    numbers: Numbers = FLOAT  # the numbers of weights, z, the system and every value built from them


def _shape(x) -> tuple:
    """The shape of a float array or of an ``Extended``."""
    return x.m.shape if isinstance(x, Extended) else jnp.shape(x)


def _scaled(numbers: Numbers, x, factor):
    """x times a float array ``factor`` broadcasting against it (an ``Extended``'s exponent broadcast too)."""
    shape = jnp.broadcast_shapes(_shape(x), jnp.shape(factor))
    return numbers.scale(numbers.apply(lambda v: jnp.broadcast_to(v, shape), x), factor)


def _expand(numbers: Numbers, x, axis: int = -1):
    """x with a new axis of size 1 at ``axis``."""
    return numbers.apply(lambda v: jnp.expand_dims(v, axis), x)


def _sum_leading(numbers: Numbers, x, k: int):
    """The sum of x (2, r, K) over its first two axes: (K,) (0 for r = 0)."""
    if _shape(x)[1] == 0:
        return numbers.zeros((k,))
    return numbers.total(numbers.apply(lambda v: v.reshape(-1, k), x), 0)


def _below_top(gap, numbers: Numbers = FLOAT):
    """exp(gap) for a term's logit minus its row's largest present logit (gap <= 0); 0 for a gap above 0, which
    only a class with no vertex in the row has (e.g. the isolated class without isolated vertices): its count
    is 0, and exp of a gap of thousands would be inf, and inf * 0 NaN."""
    above = gap > 0.0
    return numbers.where(above, numbers.zeros(jnp.shape(gap)), numbers.exp(jnp.where(above, 0.0, gap)))


def _log_size(numbers: Numbers, x) -> jnp.ndarray:
    """log2 x for x > 0 (float or ``Extended``), -inf for x <= 0: a comparison of weights beyond float64's range."""
    m, e = (x.m, x.e) if isinstance(x, Extended) else (x, 0.0)
    return jnp.where(m > 0, jnp.log2(jnp.where(m > 0, m, 1.0)) + e, -jnp.inf)


def _mean_counts(numbers: Numbers, weighted, counts, z):
    """(c - c_ref, cbar - c_ref): the counts (T, *R, C) measured from the row's heaviest term's c_ref and their mean
    sum over the terms of weight x class size x (c - c_ref) / z, as floats.

    c - cbar is then (c - c_ref) - (cbar - c_ref): where one term holds all but q of the row, its own c~ is -(cbar -
    c_ref) (order q) to relative accuracy, where c - cbar in floats keeps one ulp of c, and Var_P(c) (order q)
    gained that ulp squared: 1e-33 for 2e-49 (V trained, the self-loop of a row at |theta|/tau = 1e3), F wrong by 5e15
    once the solve multiplied it by the 1e50 expected self-loops."""
    heaviest = jnp.argmax(jax.lax.stop_gradient(_log_size(numbers, weighted)), axis=0)
    ref = jnp.take_along_axis(counts, jnp.broadcast_to(heaviest[None, ..., None], (1,) + counts.shape[1:]), 0)
    shifted = counts - ref
    total = numbers.total(_scaled(numbers, _expand(numbers, weighted), shifted), 0)
    return shifted, numbers.to_float(numbers.div(total, _expand(numbers, z)))


def _chain_rows(theta_array: jnp.ndarray, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT) -> _Rows:
    """Row weights, edge counts c(u, v) (``gradflow.policy``), normalisers and score Jacobians of the
    chain seen from ``start``.

    Nine terms per row: the far classes (every degree-1 / degree-2 chain vertex, every isolated vertex)
    with the far formula, then successor, self and predecessor each as actual weight minus far weight.
    """
    shape = (2, n - 1)

    def scores_of(x):
        s = row_scores(Theta.from_array(x), n, model, start=start)
        chain = jnp.stack([jnp.broadcast_to(f, shape) for f in (s.alpha, s.beta, s.gamma)], axis=-1)
        return chain, jnp.asarray(s.isolated)

    x = jnp.asarray(theta_array, dtype=float)
    jac, iso_jac = jax.jacfwd(scores_of)(x)
    theta = Theta.from_array(x)
    scores = row_scores(theta, n, model, start=start)
    rows = row_logits(scores, n, model)
    system = chain_system(theta, n, model, start, numbers)
    top = system.scaled.top
    targets = chain_targets(n)
    b = lambda v: jnp.broadcast_to(v, shape)
    ex = lambda logit: _below_top(b(logit - top), numbers)
    present = lambda flag, logit: numbers.where(b(flag), ex(jnp.where(flag, logit, top)), numbers.zeros(shape))
    minus = lambda w: numbers.scale(w, -1.0)
    weights = numbers.stack(
        [
            ex(rows.g),
            ex(2.0 * rows.g),
            ex(jnp.zeros(shape)),
            ex(rows.succ),
            minus(ex(rows.base_succ)),
            numbers.scale(ex(rows.self_), 0.0 if model.mask_self else 1.0),
            minus(ex(rows.base_self)),
            present(rows.has_pred, rows.pred),
            minus(present(rows.has_pred, rows.base_pred)),
        ]
    )
    local = lambda c: jnp.broadcast_to(jnp.asarray(c, float), shape + (3,))
    gamma_count = lambda degree: local(np.stack(np.broadcast_arrays(0, 0, degree), -1))
    counts = jnp.stack(
        [
            gamma_count(1.0),
            gamma_count(2.0),
            gamma_count(0.0),
            local(targets.succ),
            gamma_count(targets.deg_succ),
            local(targets.self_),
            gamma_count(targets.deg_self),
            local(targets.pred),
            gamma_count(targets.deg_pred),
        ]
    )
    m = model.n_isolated
    ones_values = _class_values(jnp.ones((2, n, 1)), jnp.ones((1,)), n, m)[..., 0]  # vertex counts per term
    weighted = _scaled(numbers, weights, ones_values)
    z = numbers.total(weighted, 0)
    counts, cbar = _mean_counts(numbers, weighted, counts, z)

    y = scores.isolated
    n_deg1, n_deg2, n_deg0 = degree_counts(n, m)
    iso_top = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(y, 2.0 * y), 0.0))
    iso_weights = numbers.exp(jnp.stack([y, 2.0 * y, jnp.zeros_like(y)]) - iso_top)
    iso_counts = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    iso_multiplicity = jnp.array([n_deg1, n_deg2, n_deg0 - (1.0 if model.mask_self else 0.0)])
    iso_weighted = _scaled(numbers, iso_weights, iso_multiplicity)
    iso_z = numbers.total(iso_weighted, 0)
    iso_counts, iso_cbar = _mean_counts(numbers, iso_weighted, iso_counts, iso_z)
    iso_jac = jnp.zeros((3, Theta.size())).at[2].set(iso_jac)
    return _Rows(weights, counts, z, cbar, jac, iso_weights, iso_counts, iso_z, iso_cbar, iso_jac, system, numbers=numbers)


# V trained (docs/THEORY.md §10): the twelve terms of a chain row and the seven of the isolated row
_TRAINED_SIGNS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
_TRAINED_ISO_SIGNS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0])


def _trained_logits(x, n: int, model: ModelSpec, start):
    """The logits of the row terms of ``_trained_rows`` from the ten numbers x: chain rows (12, 2(n-1)), the
    isolated row (7,) (``two_matrix.start_logits``; an absent term's logit is 0, its weight masked)."""
    logits = two_matrix.start_logits(Theta.from_array(x, "trained"), n, model, start)
    pos = np.tile(np.arange(1, n), 2)  # the position 1..n-1 of each chain row (chain a, then chain b)
    full = lambda v: jnp.broadcast_to(v, (2 * (n - 1),))
    chain = [logits.chain_start, logits.interior, logits.terminal, 0.0]
    chain += [logits.succ, jnp.where(pos == n - 1, logits.terminal, logits.interior)]
    chain += [logits.self_, jnp.where(pos == 1, logits.chain_start, logits.interior)]
    chain += [jnp.where(pos >= 2, logits.pred, 0.0), jnp.where(pos == 2, logits.chain_start, logits.interior)]
    chain += [logits.start_class + logits.start_extra, logits.start_class]
    iso = [logits.iso_start, logits.iso_interior, logits.iso_terminal, 0.0, logits.iso_self]
    iso += [logits.iso_start_class + logits.iso_start_extra, logits.iso_start_class]
    return jnp.stack([full(v) for v in chain]), jnp.stack([jnp.asarray(v, dtype=float) for v in iso])


def _trained_rows(theta_array, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT) -> _Rows:
    """``_chain_rows`` for V trained: each term's score gradient is d logit / d theta itself (K = P = 10, the
    Jacobian the identity).

    Chain row terms: the far classes (every chain start, interior vertex, terminal, isolated vertex), then
    successor, self, predecessor and the start (where it is far) each as actual weight minus class weight.
    Isolated row: the three classes, the other isolated vertices, itself, the start's actual minus class.
    The weights are in the scale of ``two_matrix.start_system`` (the matrix of every solve).
    """
    x = jnp.asarray(theta_array, dtype=float)
    shape, p, m = (2, n - 1), Theta.size("trained"), model.n_isolated
    system = two_matrix.start_system(Theta.from_array(x, "trained"), n, model, start, numbers)
    logits, iso_logits = _trained_logits(x, n, model, start)
    grads, iso_grads = jax.jacfwd(lambda y: _trained_logits(y, n, model, start))(x)
    start_far = two_matrix.start_logits(Theta.from_array(x, "trained"), n, model, start).start_far
    pos = np.tile(np.arange(1, n), 2)  # the position 1..n-1 of each chain row (chain a, then chain b)
    yes = jnp.ones(2 * (n - 1), dtype=bool)
    present = jnp.stack([yes, yes, yes, yes & (m > 0), yes, yes, yes & (not model.mask_self), yes, pos >= 2, pos >= 2])
    present = jnp.concatenate([present, jnp.stack([start_far, start_far])])
    present = present & _with_far_member(present, n, m, start)
    top = system.top
    weights = numbers.exp(jnp.where(present, logits, top) - top)
    weights = numbers.where(present, weights, numbers.zeros(present.shape))
    weights = numbers.apply(lambda v: v.reshape((12,) + shape), _scaled(numbers, weights, _TRAINED_SIGNS[:, None]))
    counts = grads.reshape((12,) + shape + (p,))
    weighted = _scaled(numbers, weights, _trained_values(jnp.ones((2, n, 1)), jnp.ones((1,)), n, m, start)[..., 0])
    z = numbers.total(weighted, 0)
    counts, cbar = _mean_counts(numbers, weighted, counts, z)
    jac = jnp.broadcast_to(jnp.eye(p), shape + (p, p))

    iso_present = jnp.array([True, True, True, m > 1, not model.mask_self, True, True])
    iso_top = jax.lax.stop_gradient(jnp.max(jnp.where(iso_present, iso_logits, -jnp.inf)))
    iso_weights = numbers.exp(jnp.where(iso_present, iso_logits, iso_top) - iso_top)
    iso_weights = _scaled(numbers, numbers.where(iso_present, iso_weights, numbers.zeros((7,))), _TRAINED_ISO_SIGNS)
    iso_weighted = _scaled(numbers, iso_weights, _trained_iso_values(jnp.ones((2, n, 1)), jnp.ones((1,)), n, m, start)[..., 0])
    iso_z = numbers.total(iso_weighted, 0)
    iso_grads, iso_cbar = _mean_counts(numbers, iso_weighted, iso_grads, iso_z)
    return _Rows(weights, counts, z, cbar, jac, iso_weights, iso_grads, iso_z, iso_cbar, jnp.eye(p), system, start, numbers)


def _member_classes(n: int, start) -> jnp.ndarray:
    """(4, 2(n-1)): the class (0 chain starts, 1 interior vertices, 2 terminals) of each chain row's corrected members:
    successor, self, predecessor, start."""
    pos = np.tile(np.arange(1, n), 2)
    return jnp.stack(
        [np.where(pos == n - 1, 2, 1), np.where(pos == 1, 0, 1), np.where(pos == 2, 0, 1), jnp.where(start == 1, 0, 1) + 0 * pos]
    )


def _trained_groups(n: int, start, isolated: bool) -> jnp.ndarray:
    """The group of each term of ``_trained_rows`` (chain rows (12, 2, n-1), or the isolated row (7,)): a far class's
    term and its members' minus-class corrections share their class's group (0..3), the actual weights group 4."""
    if isolated:
        return jnp.stack([0, 1, 2, 4, 4, 4, jnp.where(start == 1, 0, 1)])
    member = _member_classes(n, start)
    actual = jnp.full_like(member[0], 4)
    classes = [jnp.full_like(member[0], c) for c in range(4)]
    return jnp.stack(classes + [actual, member[0], actual, member[1], actual, member[2], actual, member[3]]).reshape(12, 2, n - 1)


def _grouped_total(numbers: Numbers, x, group):
    """The sum over the terms (axis 0) of x (T, *R, ...), each group first (None: one group).  A far class's value sum
    minus a local member's value cancels exactly only before the other terms join: summed in the terms' order, the
    terminal class's h(a_n) = 1 (times its weight 1e-51) and the successor's -1 swallowed the 1e-163 of the other
    terms of M's right-hand side (V trained, |theta|/tau = 1e3), and M came out 1e-127 for 2e-112."""
    if group is None:
        return numbers.total(x, 0)
    shape = _shape(x)
    member = jnp.reshape(group, jnp.shape(group) + (1,) * (len(shape) - jnp.ndim(group)))
    none = numbers.zeros(shape)
    parts = [numbers.total(numbers.where(jnp.broadcast_to(member == c, shape), x, none), 0) for c in range(5)]
    return numbers.total(numbers.stack(parts), 0)


def _with_far_member(present, n: int, m: int, start) -> jnp.ndarray:
    """(12, 2(n-1)) bools: False for the class terms (a far class and its actual-minus-class corrections) of a class
    whose every member is the row's successor, itself, its predecessor or the start.  Such a class holds no far
    vertex, yet its logit may set the row's scale (``two_matrix.start_system``): kept, its class weight minus
    itself would cancel the row's whole weight (z = 0 in any numbers)."""
    pos = np.tile(np.arange(1, n), 2)
    member = _member_classes(n, start)
    corrections = present[np.array([5, 7, 9, 11])]
    sizes = jnp.array([2.0, 2.0 * (n - 2), 2.0, float(m)])[:, None]
    far = sizes - jnp.stack([jnp.sum((member == c) & corrections, 0) for c in range(4)]) > 0  # (4, 2(n-1))
    corrected = jnp.take_along_axis(far, member, 0)
    always = jnp.ones_like(pos, dtype=bool)
    return jnp.stack([*far, always, corrected[0], always, corrected[1], always, corrected[2], always, corrected[3]])


def _trained_values(g, g_iso, n: int, m: int, start, numbers: Numbers = FLOAT):
    """``_class_values`` of the twelve chain-row terms of ``_trained_rows``: (12, 2, n-1, K)."""
    k = _shape(g)[-1]
    add, at = numbers.add, lambda *index: numbers.apply(lambda v: v[index], g)
    full = lambda v: numbers.apply(lambda a: jnp.broadcast_to(a, (2, n - 1, k)), v)
    classes = (add(at(0, 0), at(1, 0)), _sum_leading(numbers, at(slice(None), slice(1, n - 1)), k))
    classes += (add(at(0, n - 1), at(1, n - 1)), numbers.scale(g_iso, float(m)))
    succ, self_ = at(slice(None), slice(1, n)), at(slice(None), slice(0, n - 1))
    pred = numbers.concatenate([numbers.zeros((2, 1, k)), at(slice(None), slice(0, n - 2))], 1)
    the_start = full(at(0, start - 1))
    return numbers.stack([full(c) for c in classes] + [succ, succ, self_, self_, pred, pred, the_start, the_start])


def _trained_iso_values(g, g_iso, n: int, m: int, start, numbers: Numbers = FLOAT):
    """Values of the isolated row's seven terms (``_trained_rows``): (7, K)."""
    k = _shape(g)[-1]
    add, at = numbers.add, lambda *index: numbers.apply(lambda v: v[index], g)
    classes = [add(at(0, 0), at(1, 0)), _sum_leading(numbers, at(slice(None), slice(1, n - 1)), k)]
    classes += [add(at(0, n - 1), at(1, n - 1))]
    return numbers.stack(classes + [numbers.scale(g_iso, m - 1.0), g_iso, at(0, start - 1), at(0, start - 1)])


def _row_values(rows: _Rows, g, g_iso, n: int, model: ModelSpec, numbers: Numbers = FLOAT):
    """The values of the chain rows' terms (``_class_values``, or ``_trained_values`` with V trained)."""
    if model.values == "trained":
        return _trained_values(g, g_iso, n, model.n_isolated, rows.start, numbers)
    return _class_values(g, g_iso, n, model.n_isolated, numbers)


def _iso_row_values(rows: _Rows, g, g_iso, n: int, model: ModelSpec, numbers: Numbers = FLOAT):
    """The values of the isolated row's terms (``_iso_values``, or ``_trained_iso_values`` with V trained)."""
    if model.values == "trained":
        return _trained_iso_values(g, g_iso, n, model.n_isolated, rows.start, numbers)
    return _iso_values(g, g_iso, n, model.n_isolated, model.mask_self, numbers)


def _class_values(g, g_iso, n: int, m: int, numbers: Numbers = FLOAT):
    """Values of the nine row terms for vertex values g (2, n, K) (terminals at position n) and the
    isolated value g_iso (K,): (9, 2, n-1, K).  Far classes carry the sum over the class."""
    k = _shape(g)[-1]
    add, at = numbers.add, lambda *index: numbers.apply(lambda v: v[index], g)
    g1 = add(add(add(at(0, 0), at(1, 0)), at(0, n - 1)), at(1, n - 1))
    g2 = _sum_leading(numbers, at(slice(None), slice(1, n - 1)), k)
    succ, self_ = at(slice(None), slice(1, n)), at(slice(None), slice(0, n - 1))
    pred = numbers.concatenate([numbers.zeros((2, 1, k)), at(slice(None), slice(0, n - 2))], 1)
    full = lambda v: numbers.apply(lambda a: jnp.broadcast_to(a, (2, n - 1, k)), v)
    return numbers.stack([full(g1), full(g2), full(numbers.scale(g_iso, float(m))), succ, succ, self_, self_, pred, pred])


def _iso_values(g, g_iso, n: int, m: int, mask_self: bool, numbers: Numbers = FLOAT):
    """Values of the isolated row's three terms: (3, K)."""
    k = _shape(g)[-1]
    add, at = numbers.add, lambda *index: numbers.apply(lambda v: v[index], g)
    g1 = add(add(add(at(0, 0), at(1, 0)), at(0, n - 1)), at(1, n - 1))
    g2 = _sum_leading(numbers, at(slice(None), slice(1, n - 1)), k)
    return numbers.stack([g1, g2, numbers.scale(g_iso, m - (1.0 if mask_self else 0.0))])


def _expectations(rows: _Rows, values, order: int, isolated: bool = False):
    """sum_v P(u, v) f(c(u, v) - cbar(u)) g(v) for f = 1 (order 0), c~ (1) or c~ c~^T (2), over the chain rows (or
    the isolated row).

    weights (T, *R), counts (T, *R, C), values (T, *R, K): returns (*R, K), (*R, C, K) or (*R, C, C, K).
    """
    numbers = rows.numbers
    if isolated:
        weights, counts, z, cbar = rows.iso_weights, rows.iso_counts, rows.iso_z, rows.iso_cbar
    else:
        weights, counts, z, cbar = rows.weights, rows.counts, rows.z, rows.cbar
    group = None if rows.start is None else _trained_groups(_shape(rows.weights)[-1] + 1, rows.start, isolated)
    total = lambda x: _grouped_total(numbers, x, group)
    wv = numbers.mul(_expand(numbers, numbers.div(weights, z)), values)
    if order == 0:
        return total(wv)
    centred = counts - cbar
    if order == 1:
        return total(_scaled(numbers, _expand(numbers, wv, -2), centred[..., :, None]))
    product = centred[..., :, None, None] * centred[..., None, :, None]
    return total(_scaled(numbers, numbers.apply(lambda v: v[..., None, None, :], wv), product))


def _project(numbers: Numbers, jac, a1):
    """Js^T a1 for a1 (..., C, K): (..., P, K)."""
    return numbers.total(_scaled(numbers, _expand(numbers, a1, -2), jac[..., :, :, None]), -3)


def _project2(numbers: Numbers, jac, a2):
    """Js^T a2 Js for a2 (..., C, C) (one column): (..., P, P)."""
    a2_js = numbers.total(_scaled(numbers, _expand(numbers, a2, -1), jac[..., None, :, :]), -2)  # (..., C, P)
    return _project(numbers, jac, a2_js)


def _solve(rows: _Rows, b):
    """(I - Q)^{-1} b on the chain rows (b (2(n-1), K), either sign, in the rows' scale and numbers), in those numbers."""
    numbers, system = rows.numbers, rows.system
    if isinstance(system, two_matrix.StartSystem):
        if numbers is EXTENDED:
            return two_matrix.start_system_solve_extended(system, b)
        return two_matrix.start_system_solve(system, b, signed=True)
    if numbers is EXTENDED:
        return chain_solve_extended(system, b)
    return chain_solve(system, b, signed=True)


def _absorbing_solve(rows: _Rows, n: int, model: ModelSpec, rhs, rhs_iso, terminal_a, terminal_b):
    """Solve g = rhs + sum_v P(u, v) g(v) on the transient vertices (chains and isolated).

    rhs (2, n-1, K), rhs_iso (K,), terminal values (K,) at a_n and b_n (``rows.numbers``).  Returns g (2, n, K)
    with the terminal values at position n, and g_iso (K,).  Multiplied by each row's (scaled) weight Z, the
    system is the chain of ``gradflow.objective.chain_system`` with right-hand side Z rhs + (weight
    on the isolated vertices x their expected visits) rhs_iso + (rates into a_n, b_n) . terminal values,
    solved by the positive Woodbury of ``gradflow._linalg`` (a signed right-hand side by its two parts).
    V trained: the chain of ``gradflow.two_matrix.start_system`` (``_trained_absorbing_solve``).
    """
    if model.values == "trained":
        return _trained_absorbing_solve(rows, n, model, rhs, rhs_iso, terminal_a, terminal_b)
    numbers, system, m = rows.numbers, rows.system, model.n_isolated
    add, mul, at = numbers.add, numbers.mul, lambda x, *index: numbers.apply(lambda v: v[index], x)
    col = lambda x: _expand(numbers, x)
    k = _shape(rhs)[-1]
    if m > 0:
        y1, y2 = at(rows.iso_weights, 0), at(rows.iso_weights, 1)
        n_deg1, n_deg2, _ = degree_counts(n, m)
        w_iso = add(numbers.scale(y1, float(n_deg1)), numbers.scale(y2, float(n_deg2)))
        iso_rhs_term = mul(col(numbers.div(mul(numbers.scale(at(rows.weights, 2), float(m)), rows.iso_z), w_iso)), rhs_iso)
    else:
        iso_rhs_term = numbers.zeros(_shape(rhs))
    b = add(add(mul(col(rows.z), rhs), iso_rhs_term), add(mul(col(system.own), terminal_a), mul(col(system.other), terminal_b)))
    x = numbers.apply(lambda v: v.reshape((2, n - 1, k)), _solve(rows, numbers.apply(lambda v: v.reshape(2 * (n - 1), k), b)))
    terminals = numbers.apply(lambda v: v[:, None, :], numbers.stack([terminal_a, terminal_b]))  # (2, 1, K)
    g = numbers.concatenate([x, terminals], 1)
    if m == 0:
        return g, numbers.zeros((k,))
    g1 = add(add(at(x, 0, 0), at(x, 1, 0)), add(terminal_a, terminal_b))
    g2 = _sum_leading(numbers, at(x, slice(None), slice(1, None)), k)
    return g, numbers.div(add(add(mul(y1, g1), mul(y2, g2)), mul(rows.iso_z, rhs_iso)), w_iso)


def _trained_absorbing_solve(rows: _Rows, n: int, model: ModelSpec, rhs, rhs_iso, terminal_a, terminal_b):
    """``_absorbing_solve`` with V trained: Z rhs + iso_tokens rhs_iso + (rates into a_n, b_n) . terminal values
    solved on ``two_matrix.start_system``; the isolated value from the isolated row's terms,
    g_iso = (sum over its chain terms of weight x value + Z_iso rhs_iso) / (its weight on the chain)."""
    numbers, system = rows.numbers, rows.system
    add, mul, at = numbers.add, numbers.mul, lambda x, *index: numbers.apply(lambda v: v[index], x)
    k = _shape(rhs)[-1]
    as_rows = lambda x: numbers.apply(lambda v: jnp.broadcast_to(v, (2 * (n - 1),)).reshape(2, n - 1, 1), x)
    b = add(mul(_expand(numbers, rows.z), rhs), mul(as_rows(system.iso_tokens), rhs_iso))
    rate = lambda j: as_rows(at(system.rates, slice(None), j))
    b = add(b, add(mul(rate(0), terminal_a), mul(rate(1), terminal_b)))
    x = numbers.apply(lambda v: v.reshape((2, n - 1, k)), _solve(rows, numbers.apply(lambda v: v.reshape(2 * (n - 1), k), b)))
    g = numbers.concatenate([x, numbers.apply(lambda v: v[:, None, :], numbers.stack([terminal_a, terminal_b]))], 1)
    if model.n_isolated == 0:
        return g, numbers.zeros((k,))
    on_chain = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])  # the isolated row's terms that land on the chain
    weights = _scaled(numbers, rows.iso_weights, on_chain)
    chain_values = _trained_iso_values(g, numbers.zeros((k,)), n, model.n_isolated, rows.start, numbers)
    sizes = _trained_iso_values(jnp.ones((2, n, 1)), jnp.ones((1,)), n, 1, rows.start)[:, 0]
    chain_weight = numbers.total(_scaled(numbers, weights, sizes), 0)
    on_chain_value = numbers.total(mul(_expand(numbers, weights), chain_values), 0)
    return g, numbers.div(add(on_chain_value, mul(rows.iso_z, rhs_iso)), chain_weight)


def _moment_sources(rows: _Rows, n: int, model: ModelSpec, h, h_iso, grad, grad_iso):
    """Right-hand sides of m and M from (h, m) values: (rhs_m, rhs_m_iso, rhs_M, rhs_M_iso).

    rhs_m = Js^T E[c~ h(v)], rhs_M = Js^T E[c~ c~^T h(v)] Js + Js^T E[c~ m(v)^T] + transpose.
    h (2, n, 1), grad (2, n, P) with terminals; the isolated ones (1,), (P,) (``rows.numbers``).
    """
    numbers = rows.numbers
    first = lambda x: numbers.apply(lambda v: v[..., :1], x)
    rest = lambda x: numbers.apply(lambda v: v[..., 1:], x)
    g, g_iso = numbers.concatenate([h, grad], -1), numbers.concatenate([h_iso, grad_iso], 0)
    values = _row_values(rows, g, g_iso, n, model, numbers)
    iso_values = _iso_row_values(rows, g, g_iso, n, model, numbers)
    a1 = _expectations(rows, values, 1)  # (2, n-1, C, 1 + P)
    a2 = numbers.apply(lambda v: v[..., 0], _expectations(rows, first(values), 2))  # (2, n-1, C, C)
    i1 = _expectations(rows, iso_values, 1, isolated=True)  # (C, 1 + P)
    i2 = numbers.apply(lambda v: v[..., 0], _expectations(rows, first(iso_values), 2, isolated=True))
    p1, ip1 = _project(numbers, rows.jac, a1), _project(numbers, rows.iso_jac, i1)  # (2, n-1, P, 1 + P), (P, 1 + P)
    rhs_m, rhs_m_iso = numbers.apply(lambda v: v[..., 0], p1), numbers.apply(lambda v: v[..., 0], ip1)
    cross, iso_cross = rest(p1), rest(ip1)  # Js^T E[c~ m(v)^T]
    transposed = lambda x: numbers.apply(lambda v: jnp.swapaxes(v, -1, -2), x)
    rhs_big = numbers.add(_project2(numbers, rows.jac, a2), numbers.add(cross, transposed(cross)))
    rhs_big_iso = numbers.add(_project2(numbers, rows.iso_jac, i2), numbers.add(iso_cross, transposed(iso_cross)))
    return rhs_m, rhs_m_iso, rhs_big, rhs_big_iso


def _score_source(rows: _Rows, n: int, model: ModelSpec):
    """Right-hand side of F: sum_v P(u, v) psi psi^T = Js^T Cov_P(c) Js, chains (2, n-1, P, P) and isolated."""
    numbers = rows.numbers
    ones = numbers.of(_row_values(rows, jnp.ones((2, n, 1)), jnp.ones((1,)), n, model))
    iso_ones = numbers.of(_iso_row_values(rows, jnp.ones((2, n, 1)), jnp.ones((1,)), n, model))
    a2 = numbers.apply(lambda v: v[..., 0], _expectations(rows, ones, 2))
    i2 = numbers.apply(lambda v: v[..., 0], _expectations(rows, iso_ones, 2, isolated=True))
    return _project2(numbers, rows.jac, a2), _project2(numbers, rows.iso_jac, i2)


def _rows_of(theta_array, n: int, model: ModelSpec, start, numbers: Numbers) -> _Rows:
    """The ``_Rows`` of the model's chain seen from ``start`` (``_trained_rows`` with V trained, else ``_chain_rows``)."""
    return (_trained_rows if model.values == "trained" else _chain_rows)(theta_array, n, model, start, numbers)


def _own_readings(theta_array, n: int, model: ModelSpec, start, numbers: Numbers):
    """A reading r of h = P(own terminal) with grad r = grad h, at every chain vertex (2, n, 1) and at the isolated
    ones (1,), in ``numbers``: the absorbing solves of h and q = 1 - h (terminals (1, 0), (0, 1)) and the deviation
    e = h - 1/2 (``_deviations``), read as e while |e| <= 1/4, else as h or -q, the smaller (as
    ``gradflow.model.own_and_other``): each keeps the digits of grad h where it is read (h - 1/2 from h near 1/2 was
    right only to 1e-16 absolute: grad h 7e-41 for 1e-63, softmax at |theta|/tau = 1e3)."""
    rows = _rows_of(theta_array, n, model, start, numbers)
    terminal_a, terminal_b = numbers.of(jnp.array([1.0, 0.0])), numbers.of(jnp.array([0.0, 1.0]))
    g, g_iso = _absorbing_solve(rows, n, model, numbers.zeros((2, n - 1, 2)), numbers.zeros((2,)), terminal_a, terminal_b)
    e, e_iso = _deviations(rows, theta_array, n, model, start)

    def reading(x, deviation):
        h, q = numbers.apply(lambda v: v[..., :1], x), numbers.apply(lambda v: v[..., 1:], x)
        mid, smaller = jnp.abs(numbers.to_float(deviation)) <= 0.25, numbers.to_float(h) <= numbers.to_float(q)
        return numbers.where(mid, deviation, numbers.where(smaller, h, numbers.scale(q, -1.0)))

    return reading(g, e), reading(g_iso, e_iso)


def _deviations(rows: _Rows, theta_array, n: int, model: ModelSpec, start):
    """e = h - 1/2 at every chain vertex (2, n, 1) (terminals 1/2, -1/2) and at the isolated ones (1,).

    V fixed (softmax): e_sym + rho G(., a_start) (``gradflow.objective.softmax_deviation``: the mirror-symmetric part,
    and the start row's correction times the expected visits to the start, a positive solve).  V trained: e_sym + G r
    (``two_matrix.start_deviation``: r the residual of the mirror-symmetric part in the model's rows)."""
    numbers, zero = rows.numbers, rows.numbers.zeros((1,))
    if model.values == "trained":
        return _trained_deviations(rows, theta_array, n, model, start)
    deviation = softmax_deviation(Theta.from_array(theta_array), n, model, rows.system, start, numbers)
    at_start = (jnp.arange(2)[:, None, None] == 0) & (jnp.arange(1, n)[None, :, None] == start)  # (2, n-1, 1)
    per_row = numbers.div(deviation.diag, numbers.apply(lambda v: v[0, start - 1], rows.z))  # rhs x Z = diag at the start
    per_row = numbers.apply(lambda v: jnp.broadcast_to(v, at_start.shape), per_row)
    visits = numbers.where(at_start, per_row, numbers.zeros(at_start.shape))
    g, g_iso = _absorbing_solve(rows, n, model, visits, zero, zero, zero)
    e_sym = _mirrored(numbers, deviation.e_sym)
    rho = lambda x: numbers.mul(numbers.apply(lambda v: jnp.broadcast_to(v, _shape(x)), deviation.rho), x)
    return numbers.add(e_sym, rho(g)), rho(g_iso)


def _trained_deviations(rows: _Rows, theta_array, n: int, model: ModelSpec, start):
    """``_deviations`` with V trained: e_sym (-e_sym on chain b, 1/2 and -1/2 at the terminals, 0 at the isolated
    vertices) plus the absorbing solve of its residual (``two_matrix.start_deviation``: r / Z on the chain rows, the
    isolated vertices' part eliminated into them, and their own offset added to their mean on the chain)."""
    numbers = rows.numbers
    deviation = two_matrix.start_deviation(Theta.from_array(theta_array, "trained"), n, model, start, rows.system, numbers)
    rhs = numbers.div(numbers.apply(lambda v: v.reshape(2, n - 1), deviation.chain), rows.z)
    zero = numbers.zeros((1,))
    g, g_iso = _trained_absorbing_solve(rows, n, model, _expand(numbers, rhs), zero, zero, zero)
    e_iso = numbers.add(g_iso, numbers.apply(lambda v: v[None], deviation.iso))
    return numbers.add(_mirrored(numbers, deviation.e_sym), g), e_iso


def _mirrored(numbers: Numbers, e_sym):
    """An antisymmetric deviation at every chain vertex (2, n, 1): e_sym (n-1,) on chain a and 1/2 at a_n, their
    negatives on chain b."""
    chain_a = numbers.concatenate([e_sym, numbers.of(jnp.array([0.5]))], 0)
    return _expand(numbers, numbers.stack([chain_a, numbers.scale(chain_a, -1.0)]))


def _own_gradients(theta_array, n: int, model: ModelSpec, start, numbers: Numbers):
    """m = grad h at every chain vertex (2, n, P) and at the isolated ones (P,), in ``numbers``: forward mode (P
    tangents) through ``_own_readings``; an ``Extended`` reading's gradient is its mantissa's, at its exponent.

    The recursion m(u) = sum_v P(u, v) [psi h(v) + m(v)] solves a signed right-hand side as two positive parts that
    cancel by dozens of digits from |theta|/tau of a few hundred (1e72 where m is 1e-93 at 1e3); M's right-hand side
    needs m at every row, and this derivative keeps its digits there."""
    values = lambda y: (lambda v: (v, v))(_own_readings(y, n, model, start, numbers))
    jacobians, own = jax.jacfwd(values, has_aux=True)(jnp.asarray(theta_array, dtype=float))
    if numbers is EXTENDED:
        gradient = lambda jac, value: Extended(jac.m[..., 0, :], jnp.broadcast_to(value.e, jac.m[..., 0, :].shape))
        return tuple(gradient(jac, value) for jac, value in zip(jacobians, own))
    return tuple(jac[..., 0, :] for jac in jacobians)


def _row_gradients(theta_array, n: int, model: ModelSpec, start, numbers: Numbers, grad_h):
    """m = grad h at every chain vertex (2, n, P) and at the isolated ones (P,), in ``numbers``, for M's right-hand side.

    Linear attention with V fixed: ``grad_h`` (the closed form's, by start distance) on chain a, -grad_h on chain b
    (h(b_i) = 1 - h(a_i)), 0 at the terminals and isolated vertices (h = 1/2 there): the closed form reads h near 1/2
    from e = h - 1/2, where grad h is 1e-1819 at |theta|/tau = 1e4 and a 2(n-1)-row solve's h (1/2 to round-off)
    gives 1e-16.  Otherwise ``_own_gradients`` (no a/b symmetry: the start's token or the start row differ)."""
    if model.attention != "linear" or model.values != "fixed":
        return _own_gradients(theta_array, n, model, start, numbers)
    chain_a = jnp.concatenate([grad_h[::-1], jnp.zeros((1, grad_h.shape[-1]))])
    return numbers.of(jnp.stack([chain_a, -chain_a])), numbers.zeros(grad_h.shape[-1:])


def _chain_moments(theta_array, n: int, model: ModelSpec, start, grad_h=None, as_float: bool = True) -> tuple:
    """(h, m, M, F) at the chain-a positions 1..n-1 of the chain seen from ``start``: (n-1,), (n-1, P), (n-1, P, P) x2,
    floats; computed in the model's numbers (``numbers_of``: the extended ones keep every row and value in range).
    Uncapped, M's right-hand side takes m from ``_row_gradients`` (``grad_h``: the closed form's m by start distance;
    the recursion's own m loses its digits).  ``as_float=False`` (uncapped): in the model's numbers (an ``Extended``
    keeps values beyond float64's range: the tests' check against mpmath there)."""
    numbers = numbers_of(model)
    rows = _rows_of(theta_array, n, model, start, numbers)
    f_src, f_src_iso = _score_source(rows, n, model)
    p = Theta.size(model.values)
    flat = lambda x: numbers.apply(lambda v: v.reshape(v.shape[:-2] + (p * p,)), x)
    if model.max_len is None:
        one_zero = numbers.of(jnp.zeros(1 + p * p).at[0].set(1.0))
        rhs = numbers.concatenate([numbers.zeros((2, n - 1, 1)), flat(f_src)], -1)
        rhs_iso = numbers.concatenate([numbers.zeros((1,)), flat(f_src_iso)], 0)
        g, g_iso = _absorbing_solve(rows, n, model, rhs, rhs_iso, one_zero, numbers.zeros((1 + p * p,)))
        h, h_iso = numbers.apply(lambda v: v[..., :1], g), numbers.apply(lambda v: v[:1], g_iso)
        big_f = numbers.apply(lambda v: v[:, : n - 1, 1:], g)
        grad, grad_iso = _row_gradients(theta_array, n, model, start, numbers, grad_h)
        _, _, rhs_big, rhs_big_iso = _moment_sources(rows, n, model, h, h_iso, grad, grad_iso)
        zeros = numbers.zeros((p * p,))
        big_m, _ = _absorbing_solve(rows, n, model, flat(rhs_big), flat(rhs_big_iso), zeros, zeros)
        big_m = numbers.apply(lambda v: v[:, : n - 1], big_m)
        if as_float:
            h, grad, big_m, big_f = (numbers.to_float(x) for x in (h, grad, big_m, big_f))
    else:
        h, h_iso, grad, grad_iso, big_m, big_f = _capped_moments(rows, n, model, f_src, f_src_iso)
        big_m, big_f = flat(big_m), flat(big_f)
    select = lambda f, x: numbers.apply(f, x) if isinstance(x, Extended) else f(x)
    return (
        select(lambda v: v[0, : n - 1, 0], h),
        select(lambda v: v[0, : n - 1], grad),
        select(lambda v: v[0].reshape(n - 1, p, p), big_m),
        select(lambda v: v[0].reshape(n - 1, p, p), big_f),
    )


def _capped_moments(rows: _Rows, n: int, model: ModelSpec, f_src, f_src_iso):
    """The recursions run ``model.max_len`` times from 0 (docs/THEORY.md §8.4): values with k tokens left.

    h_{k+1} = E[h_k(v)], m_{k+1} = E[psi h_k(v) + m_k(v)], M_{k+1} = E[psi psi^T h_k + psi m_k^T +
    m_k psi^T + M_k(v)], F_{k+1} = E[psi psi^T + F_k(v)]; terminals h = 1 (a_n), 0 (b_n), others 0.
    Returns chains with terminals (2, n, .) for h, m and (2, n-1, P, P) for M, F, plus isolated h, m.
    """
    p = Theta.size(model.values)
    terminal_h = jnp.zeros((2, 1, 1)).at[0].set(1.0)
    # the columns of one stacked state: h | m | M | F
    cut_m, cut_big_m = 1 + p, 1 + p + p * p

    def with_terminals(x, terminal):
        return jnp.concatenate([x, terminal], axis=1)

    def with_zero_terminals(x):
        return with_terminals(x, jnp.zeros((2, 1) + x.shape[2:]))

    def step(_, state):
        h, h_iso, grad, grad_iso, big_m, big_m_iso, big_f, big_f_iso = state
        h_full = with_terminals(h, terminal_h)
        grad_full = with_zero_terminals(grad)
        stacked = jnp.concatenate(
            [
                h_full,
                grad_full,
                with_zero_terminals(big_m.reshape(2, n - 1, p * p)),
                with_zero_terminals(big_f.reshape(2, n - 1, p * p)),
            ],
            axis=-1,
        )
        stacked_iso = jnp.concatenate([h_iso, grad_iso, big_m_iso.reshape(p * p), big_f_iso.reshape(p * p)])
        a0 = _expectations(rows, _row_values(rows, stacked, stacked_iso, n, model), 0)
        i0 = _expectations(rows, _iso_row_values(rows, stacked, stacked_iso, n, model), 0, isolated=True)
        rhs_m, rhs_m_iso, rhs_big, rhs_big_iso = _moment_sources(rows, n, model, h_full, h_iso, grad_full, grad_iso)
        return (
            a0[..., :1],
            i0[:1],
            a0[..., 1:cut_m] + rhs_m,
            i0[1:cut_m] + rhs_m_iso,
            a0[..., cut_m:cut_big_m].reshape(2, n - 1, p, p) + rhs_big,
            i0[cut_m:cut_big_m].reshape(p, p) + rhs_big_iso,
            a0[..., cut_big_m:].reshape(2, n - 1, p, p) + f_src,
            i0[cut_big_m:].reshape(p, p) + f_src_iso,
        )

    chain = (2, n - 1)
    init = tuple(
        jnp.zeros(shape)
        for shape in (
            chain + (1,),
            (1,),
            chain + (p,),
            (p,),
            chain + (p, p),
            (p, p),
            chain + (p, p),
            (p, p),
        )
    )
    h, h_iso, grad, grad_iso, big_m, _, big_f, _ = jax.lax.fori_loop(0, model.max_len, step, init)
    return with_terminals(h, terminal_h), h_iso, with_zero_terminals(grad), grad_iso, big_m, big_f


def _require_prompt_context(model: ModelSpec) -> None:
    if model.context != "prompt":
        raise ValueError(
            f"context must be 'prompt' for closed-form noise (got {model.context!r}); "
            "the 'history' context is not Markov: estimate it with gradflow.noise.sample_scores"
        )


@eqx.filter_jit
def _moments_per_start(theta_array, task: ChainTask, model: ModelSpec) -> Moments:
    n = task.n
    grad_h = None if model.max_len is not None else _grad_h(theta_array, task, model)
    if model.attention == "linear" and model.values == "fixed":
        h, grad, big_m, big_f = _chain_moments(theta_array, n, model, None, grad_h)
    else:
        at_start = lambda s: jax.tree.map(lambda x: x[s - 1], _chain_moments(theta_array, n, model, s))
        h, grad, big_m, big_f = jax.vmap(at_start)(jnp.arange(1, n))
    moments = Moments(h[::-1], grad[::-1], big_m[::-1], big_f[::-1])
    return moments if grad_h is None else moments._replace(grad=grad_h)


def _grad_h(theta_array, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """m = E[R S] = grad h per start (n-1, P), by differentiating the closed form's h (forward mode, P tangents).

    The recursion's own m solves a signed right-hand side as two positive parts, which cancel by dozens of digits
    from |theta|/tau of a few hundred (a wrong finite value); the closed form's derivative keeps its digits there
    (docs/guide/details.md, Limits)."""
    if model.values == "trained":  # e split by its mirror-symmetric part: grad h keeps its digits where the logits tie
        h = lambda y: two_matrix.outcome_per_start(Theta.from_array(y, "trained"), task, model, split_deviation=True)[0]
    else:
        h = lambda y: same_side_probability(Theta.from_array(y, model.values), task, model)
    return jax.jacfwd(h)(theta_array)


def _theta_array(theta, model: ModelSpec) -> jnp.ndarray:
    """The parameter vector the model trains (``Theta.fields(model.values)``) of a Theta or an array."""
    x = theta.as_array(model.values) if isinstance(theta, Theta) else jnp.asarray(theta, dtype=float)
    Theta.from_array(x, model.values)  # raises for a vector of the other model's length
    return x


def moments_per_start(theta, task: ChainTask, model: ModelSpec) -> Moments:
    """h, m = E[R S], M = E[R S S^T], F = E[S S^T] for each start a_{n-d}, by d = 1..n-1 (``Moments``).

    ``theta``: a Theta or a (P,) array.  Uncapped: three O(n) positive Woodbury solves; ``model.max_len`` set:
    max_len steps of the recursions.  jit/vmap-able.
    """
    _require_prompt_context(model)
    x = _theta_array(theta, model)
    return finite_or_extended(lambda numbers_model: _moments_per_start(x, task, numbers_model), model)


class GradientNoise(NamedTuple):
    """Per-rollout estimator g = (R - b) S: covariance (P, P) and mean (P,) (= grad J), P = ``Theta.size()``."""

    covariance: jnp.ndarray
    mean: jnp.ndarray


def _baseline_value(baseline, reward):
    if isinstance(baseline, str):
        check_choice("baseline", baseline, BASELINES)
        return reward if baseline == "mean" else jnp.zeros_like(reward)
    return jnp.asarray(baseline, dtype=float)


def _second_moment(big_m, big_f, b):
    """E[(R - b)^2 S S^T] = (1 - 2b) E[R S S^T] + b^2 E[S S^T] (R in {0, 1})."""
    b = b[..., None, None]
    return (1.0 - 2.0 * b) * big_m + b * b * big_f


def gradient_covariance(theta, task: ChainTask, model: ModelSpec, baseline="mean") -> GradientNoise:
    """Covariance and mean of the per-rollout REINFORCE estimator g = (R - b) S, S = sum_t psi.

    Over the start distribution ``task.start_probs`` and the rollout.  A batch of B independent
    rollouts has covariance covariance / B (``batch_covariance``).

    Args:
        theta (Theta | jax.Array): the attention scores (a Theta or its array of shape (5,)).
        task: the chain task (its start distribution).
        model: the model (context "prompt").
        baseline (str | float): "mean" (b = J(theta), the large-batch limit of the batch-mean baseline),
            "none" (b = 0) or a number.

    Returns:
        ``GradientNoise(covariance, mean)`` in (alpha, beta, gamma, eta, delta); mean = grad J to round-off.

    Raises:
        ValueError: baseline is an unknown name.
    """
    mo = moments_per_start(theta, task, model)
    p = task.start_probs
    reward = p @ mo.reward
    mean = p @ mo.grad
    b = _baseline_value(baseline, reward)
    second = jnp.einsum("d,dij->ij", p, _second_moment(mo.reward_second, mo.score_second, jnp.broadcast_to(b, mo.reward.shape)))
    return GradientNoise(second - jnp.outer(mean, mean), mean)


def _pooled(mo: Moments, p):
    """Start-weighted J, grad J, E[R S S^T], E[S S^T]."""
    return (p @ mo.reward, p @ mo.grad, jnp.einsum("d,dij->ij", p, mo.reward_second), jnp.einsum("d,dij->ij", p, mo.score_second))


def _batch_noise(theta_array, task: ChainTask, model: ModelSpec, batch, baseline: str) -> GradientNoise:
    """``batch_covariance`` with a traced ``batch`` (no checks)."""
    reward, mean, big_m, big_f = _pooled(_moments_per_start(theta_array, task, model), task.start_probs)
    outer = jnp.outer(mean, mean)
    if baseline == "none":
        return GradientNoise((big_m - outer) / batch, mean)
    sigma = (1.0 - 2.0 * reward) * big_m + reward**2 * big_f - outer
    if baseline == "mean":
        return GradientNoise(sigma / batch, mean)
    extra = (reward * (1.0 - reward) * big_f + outer) / (batch - 1)
    return GradientNoise((sigma + extra) / batch, mean)


def batch_covariance(theta, task: ChainTask, model: ModelSpec, batch: int, baseline: str = "leave_one_out") -> GradientNoise:
    """Covariance of the batch estimator (1/B) sum_i (R_i - b_i) S_i of B independent rollouts, and its mean.

    "mean" / "none": Sigma / B with b = J / 0.  "leave_one_out" (b_i = mean of the other B-1 rewards,
    what ``gradflow.sampling`` uses; exactly unbiased): exactly
    (Sigma_mean + (J (1 - J) E[S S^T] + grad J grad J^T) / (B - 1)) / B, where Sigma_mean is the
    per-rollout covariance with b = J (expand the U-statistic: only pairs that share a rollout survive).

    Args:
        theta (Theta | jax.Array): the attention scores (a Theta or its array of shape (5,)).
        task: the chain task (its start distribution).
        model: the model (context "prompt").
        batch: the number of rollouts B (>= 2 for "leave_one_out", else >= 1).
        baseline: "leave_one_out" (default), "mean" or "none".

    Returns:
        ``GradientNoise(covariance, mean)`` of the batch estimator.

    Raises:
        ValueError: an unknown baseline, a batch too small for it, or a context other than "prompt".
    """
    check_choice("baseline", baseline, BATCH_BASELINES)
    batch = check_int("batch", batch, 2 if baseline == "leave_one_out" else 1)
    _require_prompt_context(model)
    x = _theta_array(theta, model)
    return finite_or_extended(lambda numbers_model: _batch_noise(x, task, numbers_model, float(batch), baseline), model)


# --------------------------------------------------------------------------------------------------
# Critical batch
# --------------------------------------------------------------------------------------------------


class CriticalBatch(NamedTuple):
    """trace(Sigma) / |grad J|^2: the batch at which the estimator's signal-to-noise ratio is 1.

    total: for the task; per_start (n-1,): for the task concentrated on d (entry d-1), baseline b = h_d
    for "mean".  inf where the gradient is 0 (|grad| <= 1e-12 sqrt(trace Sigma): round-off level).
    """

    total: jnp.ndarray
    per_start: jnp.ndarray


def _ratio(trace, grad_sq):
    zero = grad_sq <= (ZERO_GRADIENT_RTOL**2) * trace
    return jnp.where(zero, jnp.inf, trace / jnp.where(zero, 1.0, grad_sq))


def critical_batch(theta, task: ChainTask, model: ModelSpec, baseline: str = "mean") -> CriticalBatch:
    """trace(Sigma) / |grad J|^2 for the task and per start distance d (``CriticalBatch``).

    Reduced coordinates (alpha, beta, gamma, eta, delta); with linear attention eta and delta carry no
    noise and no signal.  Batches B >> critical follow the flow; B << critical are noise-dominated.

    Args:
        theta (Theta | jax.Array): the attention scores (a Theta or its array of shape (5,)).
        task: the chain task (its start distribution).
        model: the model (context "prompt").
        baseline: "mean" (b = J, or h_d per start) or "none" (b = 0), or a number.

    Returns:
        The ``CriticalBatch`` (total, and per_start of shape (n-1,)).
    """
    mo = moments_per_start(theta, task, model)
    p = task.start_probs
    reward, mean = p @ mo.reward, p @ mo.grad
    b = _baseline_value(baseline, reward)
    second = jnp.einsum("d,dij->ij", p, _second_moment(mo.reward_second, mo.score_second, jnp.broadcast_to(b, mo.reward.shape)))
    total = _ratio(jnp.trace(second) - mean @ mean, mean @ mean)
    b_d = _baseline_value(baseline, mo.reward)
    trace_d = jnp.trace(
        _second_moment(mo.reward_second, mo.score_second, jnp.broadcast_to(b_d, mo.reward.shape)), axis1=-2, axis2=-1
    )
    grad_sq = jnp.sum(mo.grad**2, axis=-1)
    return CriticalBatch(total, _ratio(trace_d - grad_sq, grad_sq))


def critical_batch_along(trajectory, baseline: str = "mean") -> CriticalBatch:
    """``critical_batch`` at every save of a flow ``Trajectory`` (total (T,), per_start (T, n-1)).

    Uses the task the flow ascends at each save (``config.training_task(t)``) for ``total``; saves
    that are NaN (after a requested stop) give NaN.

    Args:
        trajectory (Trajectory): the solved flow.
        baseline: "mean" or "none", or a number, as in ``critical_batch``.

    Returns:
        A ``CriticalBatch`` of arrays with a leading axis over the saves.
    """
    config = trajectory.config
    thetas = np.asarray(trajectory.theta)
    ts = np.asarray(trajectory.ts)
    valid = np.isfinite(ts) & np.all(np.isfinite(thetas), axis=1)
    safe_t = jnp.asarray(np.where(valid, ts, 0.0))
    safe_theta = jnp.asarray(np.where(valid[:, None], thetas, 0.0))
    out = _critical_along(config, safe_t, safe_theta, baseline)
    total = np.where(valid, np.asarray(out.total), np.nan)
    per_start = np.where(valid[:, None], np.asarray(out.per_start), np.nan)
    return CriticalBatch(total, per_start)


@eqx.filter_jit
def _critical_along(config, ts, thetas, baseline):
    one = lambda t, x: critical_batch(x, config.training_task(t), config.model, baseline)
    return jax.vmap(one)(ts, thetas)


# --------------------------------------------------------------------------------------------------
# The stochastic flow
# --------------------------------------------------------------------------------------------------


class _ClockAndNoise(diffrax.AbstractPath):
    """The control (t, W(t)) in R^{1+5}: one vector field [drift | diffusion] times d(t, W)."""

    brownian: diffrax.VirtualBrownianTree
    t0: float
    t1: float

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            return jnp.concatenate([jnp.atleast_1d(jnp.asarray(t0, dtype=float)), self.brownian.evaluate(t0, left=left)])
        return jnp.concatenate([jnp.atleast_1d(jnp.asarray(t1 - t0, dtype=float)), self.brownian.evaluate(t0, t1, left=left)])


def _matrix_sqrt(cov):
    """Symmetric square root by eigendecomposition, eigenvalues clipped at 0 (round-off negatives)."""
    cov = 0.5 * (cov + cov.T)
    values, vectors = jnp.linalg.eigh(cov)
    return (vectors * jnp.sqrt(jnp.clip(values, 0.0))) @ vectors.T


def _noise_field(flow_params, lr, batch: int, baseline: str):
    """(t, y) -> [grad J | sqrt(lr) Cov(batch estimator)^{1/2}] of shape (P, 1 + P)."""

    def field(t, y, args):
        task = flow_params.training_task(t)
        noise = _batch_noise(y, task, flow_params.model, batch, baseline)
        return jnp.concatenate([noise.mean[:, None], jnp.sqrt(lr) * _matrix_sqrt(noise.covariance)], axis=1)

    return field


@dataclass
class SGDPaths:
    """Per-seed solutions of the SGD diffusion (``simulate_sgd``).

    ts (T,): save times (flow time t = lr * step); theta (S, T, P); reward (S, T): J on ``config.task``;
    level: the reward level of ``hit_times`` (S,): first crossing on the save grid (linear
    interpolation), inf where not reached by the last save (counted, never dropped).  diverged (S,):
    the path became non-finite (saves NaN from then on; its hit time counts only crossings before).
    Uncapped models diverge where the rollouts become astronomically long (gamma/tau >> 1: the walk
    hops among degree-2 vertices and the terminals have degree 1), a region very small batches can
    diffuse into; sampled training truncates rollouts there (50 n tokens), so give the model that
    cap (``ModelSpec(max_len=...)``) to follow it.
    """

    config: object
    lr: float
    batch: int
    baseline: str
    dt: float
    ts: np.ndarray
    theta: np.ndarray
    reward: np.ndarray
    level: float
    hit_times: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def reached(self) -> np.ndarray:
        """Per seed: whether the reward reached ``level`` by the last save (a finite hit time)."""
        return np.isfinite(self.hit_times)

    @property
    def diverged(self) -> np.ndarray:
        """Per seed: whether the path became non-finite (NaN or infinite theta at some save)."""
        return ~np.all(np.isfinite(self.theta), axis=(1, 2))

    def time_to(self, level: float) -> np.ndarray:
        """First crossing of ``level`` per seed (inf where not reached)."""
        return _hit_times(self.ts, self.reward, level)

    def hit_summary(self, level: float | None = None) -> dict:
        """Distribution of the time to ``level`` (default ``self.level``) over seeds.

        n_seeds, n_reached, n_not_reached, n_diverged (non-finite paths, see the class); mean, std and
        standard error over the seeds that reached (None if none did); quantiles 10/25/50/75/90 % over
        all seeds with "not reached" as +inf (None where the quantile is not reached).
        """
        times = self.hit_times if level is None else self.time_to(level)
        reached = times[np.isfinite(times)]
        q = np.quantile(times, [0.1, 0.25, 0.5, 0.75, 0.9], method="inverted_cdf") if times.size else []
        summary = {
            "level": float(self.level if level is None else level),
            "n_seeds": int(times.size),
            "n_reached": int(reached.size),
            "n_not_reached": int(times.size - reached.size),
            "n_diverged": int(np.sum(self.diverged)),
            "mean": float(reached.mean()) if reached.size else None,
            "std": float(reached.std(ddof=1)) if reached.size > 1 else None,
            "sem": float(reached.std(ddof=1) / np.sqrt(reached.size)) if reached.size > 1 else None,
        }
        summary["quantiles"] = {
            f"{int(round(100 * p))}": (float(v) if np.isfinite(v) else None) for p, v in zip((0.1, 0.25, 0.5, 0.75, 0.9), q)
        }
        return summary


def _hit_times(ts, rewards, level) -> np.ndarray:
    out = [first_crossing(ts, r, level) for r in np.asarray(rewards)]
    return np.array([np.inf if t is None else t for t in out])


@eqx.filter_jit
def _sde_solve(flow_params, y0, lr, keys, dt, t0, t1, save_ts, n_steps: int, batch, baseline: str):
    field_fn = _noise_field(flow_params, lr, batch, baseline)
    model = flow_params.model

    def one(key):
        brownian = diffrax.VirtualBrownianTree(t0, t1, tol=dt / 8.0, shape=(Theta.size(model.values),), key=key)
        sde = EulerMaruyama(field_fn, _ClockAndNoise(brownian, t0, t1), dt)
        solution = integrate(flow_params, diffrax.SaveAt(ts=save_ts), t0=t0, t1=t1, y0=y0, max_steps=n_steps + 2, sde=sde)
        return solution.ys, solution.result == diffrax.RESULTS.successful

    thetas, ok = jax.vmap(one)(keys)
    reward = jax.vmap(jax.vmap(lambda x: expected_reward(Theta.from_array(x), flow_params.task, model)))(thetas)
    return thetas, reward, ok


def simulate_sgd(
    flow_params,
    lr: float,
    batch: int,
    keys,
    *,
    baseline: str = "mean",
    level: float | None = None,
    t1: float | None = None,
    dt: float | None = None,
    save_every: int | None = None,
) -> SGDPaths:
    """SGD with rate lr and batch B in the diffusion limit, on the flow's time axis t = lr * step.

        d theta = grad J dt + sqrt(lr) Cov_B(theta)^{1/2} dW,   Cov_B = Sigma / B for baseline "mean",

    (``batch_covariance``: "none", or "leave_one_out", exactly what ``gradflow.sampling.train`` steps
    on).  Integrated with diffrax: Euler-Maruyama (Ito, as SGD: the noise is evaluated at the start of
    each step), a ``VirtualBrownianTree`` (tol dt/8) per key, Sigma^{1/2} by a symmetric
    eigendecomposition with eigenvalues clipped at 0.  All keys in one vmapped compilation.
    Coordinates "reduced" only; a schedule is honoured through ``training_task(t)``.

    Args:
        flow_params (FlowParams): the config (task, model, theta0, t0, t1, reward_threshold, schedule).
        lr: the SGD learning rate, > 0.
        batch: the batch size B (>= 2 for "leave_one_out", else >= 1).
        keys (jax.Array): jax PRNG keys, one per seed (at least one; a single key is one seed).
        baseline: "mean" (default), "none" or "leave_one_out".
        level: the reward level of ``hit_times``, in (0, 1) (default: ``flow_params.reward_threshold``).
        t1: the last time (default ``flow_params.t1``).
        dt: the step (default lr: the SGD grid itself, so the drift's O(lr) discretisation is SGD's).
        save_every: save every this many steps (default: every step up to 20000 steps, else 20000 saves).

    Returns:
        The ``SGDPaths``: per-seed theta and reward (J on ``flow_params.task``) at the saves, and
        hit_times, the first crossing of ``level`` (inf if not reached).

    Raises:
        ValueError: a setting is out of range, coords is not "reduced", the context is not "prompt",
            t1 <= t0, or keys is empty.
        RuntimeError: a path's reward is NaN or infinite; the message names the config, the failed
            seeds, the time and theta.
    """
    check_positive("lr", lr)
    check_choice("baseline", baseline, BATCH_BASELINES)
    batch = check_int("batch", batch, 2 if baseline == "leave_one_out" else 1)
    if flow_params.coords != "reduced":
        raise ValueError("simulate_sgd: coords must be 'reduced' (the full-matrix noise is not in the five numbers)")
    _require_prompt_context(flow_params.model)
    dt = float(lr if dt is None else dt)
    check_positive("dt", dt)
    t0 = float(flow_params.t0)
    t1 = float(flow_params.t1 if t1 is None else t1)
    if not t1 > t0:
        raise ValueError(f"t1 must be > t0, got t0={t0}, t1={t1}")
    n_steps = int(np.ceil((t1 - t0) / dt - 1e-9))
    t1 = t0 + n_steps * dt
    if save_every is None:
        save_every = max(1, int(np.ceil(n_steps / 20_000)))
    save_every = check_int("save_every", save_every, 1)
    save_ts = t0 + dt * np.arange(0, n_steps + 1, save_every)
    keys = jnp.asarray(keys)
    if keys.ndim == 0 or (not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) and keys.ndim == 1):
        keys = keys[None]
    if keys.shape[0] == 0:
        raise ValueError("keys must hold at least one jax PRNG key (one per seed), got none")
    level = check_fraction("level", flow_params.reward_threshold if level is None else level)
    start = time.perf_counter()
    thetas, reward, ok = _sde_solve(
        flow_params,
        flow_params.theta0.as_array(flow_params.model.values),
        jnp.asarray(lr, dtype=float),
        keys,
        jnp.asarray(dt),
        jnp.asarray(t0),
        jnp.asarray(t1),
        jnp.asarray(save_ts),
        n_steps,
        jnp.asarray(float(batch)),
        baseline,
    )
    thetas, reward, ok = jax.device_get((thetas, reward, ok))
    seconds = time.perf_counter() - start
    bad = ~np.asarray(ok) | ~np.all(np.isfinite(reward), axis=1)
    if np.any(bad):
        seed = int(np.argmax(bad))
        k = int(np.argmax(~np.isfinite(reward[seed]))) if not np.all(np.isfinite(reward[seed])) else len(save_ts) - 1
        raise RuntimeError(
            f"simulate_sgd: {config_label(flow_params)}: the SDE solve failed for seeds {np.nonzero(bad)[0].tolist()} "
            f"(seed {seed}: reward {float(reward[seed, k])} at save {k}, t = {float(save_ts[k]):.6g}, "
            f"theta = {np.round(thetas[seed, k], 6).tolist()})"
        )
    stats = {"seconds": seconds, "steps": n_steps, "seeds": int(thetas.shape[0]), "save_every": save_every}
    return SGDPaths(
        flow_params,
        float(lr),
        batch,
        baseline,
        dt,
        np.asarray(save_ts),
        np.asarray(thetas),
        np.asarray(reward),
        level,
        _hit_times(save_ts, reward, level),
        stats,
    )


# --------------------------------------------------------------------------------------------------
# Token-level samples of (R, S)
# --------------------------------------------------------------------------------------------------


class ScoreSamples(NamedTuple):
    """Per-rollout reward (B,), score S = grad log p(path) in the numbers of ``Theta`` (B, P), distance d (B,)."""

    rewards: jnp.ndarray
    scores: jnp.ndarray
    distances: jnp.ndarray


def sample_scores(theta, task: ChainTask, model: ModelSpec, key, batch: int, max_len: int | None = None) -> ScoreSamples:
    """Token-level rollouts (``gradflow.sampling.rollouts``) and each path's score in the numbers the model
    trains (``Theta.fields(model.values)``: the five, or the ten with V trained).

    The path is replayed through ``gradflow.sampling.path_log_prob`` (full attention matrix, and with V
    trained the full value matrix, built from theta) and differentiated in forward mode.

    Args:
        theta (Theta | jax.Array): the attention scores (a Theta or its array of shape (5,)).
        task: the chain task.
        model: the model.
        key (jax.Array): the jax.random key of the rollouts.
        batch: the number of rollouts.
        max_len: the cap (default ``model.max_len``, else the sampler's truncation).

    Returns:
        ``ScoreSamples``: rewards (batch,), scores (batch, P) and start distances (batch,).
    """
    theta = theta if isinstance(theta, Theta) else Theta.from_array(theta, model.values)
    n_vocab = 2 * task.n + model.n_isolated
    if max_len is None:
        max_len = model.max_len
    ro = sampling.rollouts(
        sampling.full_attention(theta, n_vocab), task, model, key, batch, max_len, _value_matrix(theta, n_vocab, model)
    )
    return ScoreSamples(ro.rewards, _replay_scores(theta.as_array(model.values), ro, task.n, n_vocab, model), ro.distances)


def _value_matrix(theta: Theta, n_vocab: int, model: ModelSpec):
    """The full V of a two-matrix model (``sampling.full_values``), None for the fixed V."""
    return sampling.full_values(theta, n_vocab) if model.values == "trained" else None


@eqx.filter_jit
def _replay_scores(theta_array, ro, n: int, n_vocab: int, model: ModelSpec):
    start = n - ro.distances - 1

    def log_probs(x):
        theta = Theta.from_array(x, model.values)
        a, v = sampling.full_attention(theta, n_vocab), _value_matrix(theta, n_vocab, model)
        return jax.vmap(lambda lab, p, s: sampling.path_log_prob(a, lab, p, s, n, model, v))(ro.labels, ro.paths, start)

    return jax.jacfwd(log_probs)(theta_array)
