"""The policy's row structure (docs/THEORY.md §2.5), defined once: which logit a query vertex gives each target.

Vertices are indexed as in ``gradflow.model.vertex_names``: a_1..a_n (0..n-1), b_1..b_n (n..2n-1), then
the isolated vertices; the prompt's edges are (a_i, a_{i+1}) and (b_i, b_{i+1}).  For a query vertex u
and a target v, c(u, v) counts the prompt edges that contain v, by their kind relative to u:

    c(u, v) = (#out-edges (u, w) containing v, #in-edges (w, u) containing v, #edges not touching u containing v),

and the next-vertex logit of v is c(u, v) . s(u), s(u) the row's effective (alpha, beta, gamma) scores
(theta / tau for linear attention; ``query_scores``).  So, for u = a_i: successor (1, 0, [i+1 <= n-1]),
itself (1, [i >= 2], 0), predecessor (0, 1, [i >= 3]), any other chain vertex (0, 0, deg v), an
isolated vertex (0, 0, 0).  Every closed form (uncapped, capped, noise moments), greedy decoding and
the dense matrix read their rows off ``edge_counts``; nothing else writes this table.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _chain_position(k, n: int):
    """(chain 0/1, position 1..n, is a chain vertex) of canonical vertex k (numpy or jax integers)."""
    return k // n, k % n + 1, k < 2 * n


def vertex_degree(k, n: int):
    """deg(k): prompt edges containing canonical vertex k (1 at a chain end, 2 inside, 0 isolated).

    Args:
        k (int | np.ndarray | jax.Array): canonical vertex indices (numpy or traced jax integers), any shape.
        n: the chain length.

    Returns:
        degree (np.ndarray | jax.Array): deg(k), shaped like ``k``.
    """
    _, pos, on_chain = _chain_position(k, n)
    return on_chain * ((pos < n) * 1 + (pos > 1) * 1)


def edge_counts(u, v, n: int):
    """c(u, v), shape broadcast(u, v) + (3,): the prompt edges containing v by kind relative to u.

    Kinds (out-edge of u, in-edge of u, edge not touching u): the coefficients of (alpha, beta, gamma)
    in the logit of v.

    Args:
        u (int | np.ndarray | jax.Array): query vertices, canonical indices (numpy or traced jax integers).
        v (int | np.ndarray | jax.Array): target vertices, canonical indices, broadcasting against ``u``.
        n: the chain length.

    Returns:
        counts (np.ndarray | jax.Array): c(u, v), shape broadcast(u, v) + (3,) (jax when u or v is a jax array).
    """
    chain_u, pos_u, on_u = _chain_position(u, n)
    chain_v, pos_v, on_v = _chain_position(v, n)
    same = on_u & on_v & (chain_u == chain_v)
    has_out, has_in = on_u & (pos_u < n), on_u & (pos_u > 1)
    is_self = u == v
    out = is_self * has_out + (same & (pos_v == pos_u + 1)) * 1  # the edge (u, v), or u's own out-edge
    inc = is_self * has_in + (same & (pos_v == pos_u - 1)) * 1  # the edge (v, u), or u's own in-edge
    touching = out + inc  # edges containing v that touch u
    far = vertex_degree(v, n) - touching
    xp = jnp if any(isinstance(x, jax.Array) for x in (u, v, n)) else np
    return xp.stack(xp.broadcast_arrays(out, inc, far), axis=-1)


def context_counts(u, n: int):
    """(#out-edges, #in-edges, #far edges) of the prompt relative to query u: the softmax normaliser's terms.

    Args:
        u (int | np.ndarray | jax.Array): query vertices, canonical indices, any shape.
        n: the chain length.

    Returns:
        counts (tuple): the numbers of out-edges, in-edges and far edges, each shaped like ``u``.
    """
    _, pos, on_chain = _chain_position(u, n)
    out, inc = on_chain & (pos < n), on_chain & (pos > 1)
    return out * 1, inc * 1, 2 * (n - 1) - out - inc


class ChainTargets(NamedTuple):
    """The targets of the chain rows a_i, i = 1..n-1 (chain b alike), read off ``edge_counts``; numpy, static.

    succ, self_, pred: c(a_i, a_{i+1}), c(a_i, a_i), c(a_i, a_{i-1}), each (n-1, 3) (pred: zeros at i = 1,
    where it is absent: see ``has_pred``); deg_*: the degree those vertices have, i.e. what the far-vertex
    formula gamma * deg would give them (0 where absent); far1, far2: how many non-local degree-1 and
    degree-2 chain vertices (both chains) the row sees.
    """

    succ: np.ndarray
    self_: np.ndarray
    pred: np.ndarray
    deg_succ: np.ndarray
    deg_self: np.ndarray
    deg_pred: np.ndarray
    has_pred: np.ndarray
    far1: np.ndarray
    far2: np.ndarray


def distinct_rows_traced(n, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``distinct_rows`` for a traced n laid out in ``rows`` row slots: positions (4,) = (1, 2, 3, n-1)
    clipped to n - 1 (repeats are harmless), kind (rows,) and valid (rows,): slot k holds a row iff k < n - 1."""
    positions = jnp.minimum(jnp.array([1, 2, 3]), n - 1)
    positions = jnp.concatenate([positions, jnp.reshape(n - 1, (1,))])
    i = jnp.arange(1, rows + 1)
    kind = jnp.where(i == n - 1, 3, jnp.minimum(i, 3) - 1)
    return positions, kind, i <= n - 1


def distinct_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The chain rows that differ: positions i in {1, 2, 3, n-1} (rows a_3..a_{n-2} are alike), and for
    every row i = 1..n-1 the index of its distinct row, so a per-row quantity is computed once per kind.

    Args:
        n: the chain length.

    Returns:
        (positions, kind): the distinct positions (ascending) and, for i = 1..n-1, ``positions[kind[i-1]] ~ i``.
    """
    positions = np.unique(np.minimum([1, 2, 3, n - 1], n - 1))
    i = np.arange(1, n)
    representative = np.where((i > 3) & (i < n - 1), 3, i)
    return positions, np.searchsorted(positions, representative)


def chain_targets(n: int, positions=None) -> ChainTargets:
    """``ChainTargets`` of the chain-a rows a_i (canonical u = i - 1), i = 1..n-1 or the ``positions`` given."""
    traced = isinstance(n, jax.Array) or isinstance(positions, jax.Array)
    xp = jnp if traced else np
    u = np.arange(n - 1) if positions is None else xp.asarray(positions) - 1
    has_pred = u >= 1
    pred = xp.where(has_pred, u - 1, u)
    deg = lambda v: vertex_degree(v, n)
    c_pred = xp.where(has_pred[:, None], edge_counts(u, pred, n), 0)
    deg_succ, deg_self, deg_pred = deg(u + 1), deg(u), xp.where(has_pred, deg(pred), 0)
    local1 = (deg_succ == 1) * 1 + (deg_self == 1) + (deg_pred == 1)
    local2 = (deg_succ == 2) * 1 + (deg_self == 2) + (deg_pred == 2)
    return ChainTargets(
        edge_counts(u, u + 1, n),
        edge_counts(u, u, n),
        c_pred,
        deg_succ,
        deg_self,
        deg_pred,
        has_pred,
        (4 - local1).astype(float),
        (2.0 * (n - 2) - local2).astype(float),
    )


def count_logit(counts, alpha, beta, gamma):
    """c . (alpha, beta, gamma) for counts (..., 3) and scores broadcasting against counts[..., 0].

    Args:
        counts (array-like): edge counts c(u, v), shape (..., 3).
        alpha (float | jax.Array): the out-edge score.
        beta (float | jax.Array): the in-edge score.
        gamma (float | jax.Array): the far-edge score.

    Returns:
        logit (jax.Array): the logits, shape broadcast(counts[..., 0], alpha, beta, gamma).
    """
    counts = jnp.asarray(counts, dtype=float)
    return counts[..., 0] * alpha + counts[..., 1] * beta + counts[..., 2] * gamma


def degree_counts(n: int, n_isolated: int) -> tuple[int, int, int]:
    """How many vertices have degree 1, 2 and 0: (4 chain ends, 2n - 4 interior, the isolated ones).

    An isolated query sees every vertex by these classes: c(u, v) = (0, 0, deg v).

    Args:
        n: the chain length.
        n_isolated: the number of isolated vertices.

    Returns:
        The counts of degree-1, degree-2 and degree-0 vertices.
    """
    degrees = vertex_degree(np.arange(2 * n + n_isolated), n)
    return int(np.sum(degrees == 1)), int(np.sum(degrees == 2)), int(np.sum(degrees == 0))
