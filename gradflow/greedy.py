"""Greedy decoding read-outs, exact at any theta (docs/THEORY.md §7.5: the authors' evaluation).

Greedy decoding writes the most probable next vertex at every step (argmax of the next-vertex
logits), so the path from each start is deterministic and the read-outs are exact 0/1 outcomes per
start distance d, averaged over a task with its start probabilities:

- ``accuracy``: the first terminal written is the start's own (within the cap, if any);
- ``reach_rate``: some terminal is written (within the cap);
- ``conditional_accuracy``: accuracy among the starts whose greedy path writes a terminal,
  sum_d p_d correct_d / sum_d p_d reached_d (the authors' reported metric; NaN if none is reached);
- ``traversal_accuracy``: the path is exactly the chain suffix a_{n-d+1}, ..., a_n ("chain traverse
  accuracy"; needs d <= max_len).

Cap: ``model.max_len`` (or the ``max_len`` keyword, which wins when given).  Without a cap the path
runs until its first terminal; a greedy walk is a deterministic function of the current vertex (the
context is the prompt), so a path that has not ended after visiting every transient vertex once is
in a cycle and never ends: it counts as reaching no terminal (``reached`` False, ``length`` the
number of tokens scanned, 2n + n_isolated).

Tie rule.  When several vertices share the largest logit exactly, the path takes the first of them
in ``gradflow.model.vertex_names`` order (a_1..a_n, b_1..b_n, isolated) with ``tie_break="first"``
(what numpy/torch argmax over that order does), or the last with ``tie_break="last"``.  The order is
a convention (real vertex labels are random), so every start whose path passed a tie reports
``tied`` True: its outcome may depend on the rule.  A symmetric model has such exact ties: with
beta = gamma (theta = (alpha, 0, 0) for instance) the self-loop and the forward step have the same
logit at every interior vertex, and with gamma = 0 at the chain head a_1 as well; "first" then
stalls on the self-loop and "last" steps forward.  A tie counts when at least two vertices
(isolated vertices counted as one, they are interchangeable) lie within ``tie_tol`` (relative to
max(1, |largest logit|)) of the largest logit; ``margin`` is the smallest gap between the chosen
logit and the best other one along the path.  Logits are the rows of ``transition_matrix``
(``gradflow.model.next_vertex_logits``), one O(n) row per step, so ties are bitwise the same as the dense matrix's.

V trained (``ModelSpec(values="trained")``, docs/THEORY.md §10): the rows depend on the start, so each start's
walk reads its rows off ``two_matrix.start_logits`` (built once per start, one O(n) row per step by
``two_matrix.query_logits``; vmapped over starts as for softmax).  These logits drop a constant per row, so a
tie is the same as the dense token-built matrix's up to round-off (``tie_tol``).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from gradflow import two_matrix
from gradflow._checks import check_choice, check_int
from gradflow.model import ModelSpec, Theta, next_vertex_logits, vertex_names
from gradflow.task import ChainTask

TIE_BREAKS = ("first", "last")
DEFAULT_TIE_TOL = 1e-12

__all__ = ["GreedyPerStart", "GreedyMetrics", "TIE_BREAKS", "row_logits", "greedy_per_start", "greedy_metrics", "greedy_path"]


class GreedyPerStart(NamedTuple):
    """Greedy outcome per start distance d = 1..n-1 (entry d-1), each shape (n-1,).

    correct: the first terminal written is the own one (within the cap); reached: a terminal is
    written; traversed: the path is exactly the forward path; length: tokens generated (until the
    terminal, or the cap, or the cycle scan length); tied: an (exact, up to tie_tol) tie was passed;
    margin: smallest gap between the chosen and the best other logit along the path.
    """

    correct: jnp.ndarray
    reached: jnp.ndarray
    traversed: jnp.ndarray
    length: jnp.ndarray
    tied: jnp.ndarray
    margin: jnp.ndarray

    @property
    def conditional(self) -> jnp.ndarray:
        """Per start: 1 if correct, 0 if a wrong terminal, NaN if no terminal is reached."""
        return jnp.where(self.reached, self.correct.astype(float), jnp.nan)


class GreedyMetrics(NamedTuple):
    """Start-weighted greedy read-outs (scalars) and the per-start outcomes they come from."""

    accuracy: jnp.ndarray
    conditional_accuracy: jnp.ndarray
    reach_rate: jnp.ndarray
    traversal_accuracy: jnp.ndarray
    tie_rate: jnp.ndarray
    per_start: GreedyPerStart


def row_logits(theta: Theta, n: int, model: ModelSpec, u, start_vertex) -> jnp.ndarray:
    """Next-vertex logits of query vertex ``u`` (canonical index), shape (2n + n_isolated,).

    The row of ``transition_matrix`` (``gradflow.model.next_vertex_logits``), the current vertex at -inf
    when ``model.mask_self``; with V trained the row seen from the start (``two_matrix.query_logits``, up to
    a constant per row).

    Args:
        theta: the attention scores.
        n: the chain length.
        model: the model.
        u (int | jax.Array): the query vertex, a canonical index (``gradflow.model.vertex_names`` order).
        start_vertex (int | jax.Array): the canonical index of the start (it matters for softmax and with V trained).

    Returns:
        The logits, shape (2n + n_isolated,).
    """
    return _rows_from(theta, n, model, start_vertex)(u)


def _rows_from(theta: Theta, n: int, model: ModelSpec, start_vertex):
    """u -> the logits of query vertex u on the walk from start_vertex (V trained: the start's logits built once)."""
    if model.values == "trained":
        logits = two_matrix.start_logits(theta, n, model, start_vertex + 1)
        return lambda u: two_matrix.query_logits(logits, n, model, start_vertex + 1, u)
    return lambda u: next_vertex_logits(theta, u, n, model, start_vertex)


def _choose(logits: jnp.ndarray, n: int, tie_break: str, tie_tol: float):
    """(chosen vertex, tie passed, margin) for one logit row."""
    n_vertices = logits.shape[0]
    if tie_break == "first":
        v = jnp.argmax(logits)
    else:
        v = n_vertices - 1 - jnp.argmax(logits[::-1])
    best = logits[v]
    index = jnp.arange(n_vertices)
    isolated = index >= 2 * n
    same_class = (index == v) | (isolated & (v >= 2 * n))  # isolated vertices are interchangeable
    other_best = jnp.max(jnp.where(same_class, -jnp.inf, logits))
    margin = best - other_best
    tied = margin <= tie_tol * jnp.maximum(1.0, jnp.abs(best))
    return v, tied, margin


def _walk(theta: Theta, n: int, model: ModelSpec, start_vertex, steps: int, tie_break: str, tie_tol: float):
    """Greedy walk from a canonical start vertex for ``steps`` tokens (stops counting at a terminal)."""
    rows = _rows_from(theta, n, model, start_vertex)

    def body(state, _):
        u, done, correct, length, forward, tied, margin = state
        v, tie, gap = _choose(rows(u), n, tie_break, tie_tol)
        active = ~done
        terminal = (v == n - 1) | (v == 2 * n - 1)
        return (
            jnp.where(active, v, u),
            done | terminal,
            jnp.where(active & terminal, v == n - 1, correct),
            length + active,
            forward & (done | (v == u + 1)),
            tied | (active & tie),
            jnp.where(active, jnp.minimum(margin, gap), margin),
        ), None

    init = (
        jnp.asarray(start_vertex),
        jnp.asarray(False),
        jnp.asarray(False),
        jnp.asarray(0),
        jnp.asarray(True),
        jnp.asarray(False),
        jnp.asarray(jnp.inf),
    )
    (u, done, correct, length, forward, tied, margin), _ = jax.lax.scan(body, init, None, length=steps)
    return done, correct, length, forward & done, tied, margin


def _resolve(model: ModelSpec, max_len: int | None, tie_break: str) -> int | None:
    if model.context != "prompt":
        raise ValueError(f"context must be 'prompt' for greedy read-outs (got {model.context!r})")
    check_choice("tie_break", tie_break, TIE_BREAKS)
    cap = model.max_len if max_len is None else max_len
    return None if cap is None else check_int("max_len", cap, 1)


@eqx.filter_jit
def _greedy_per_start(theta, task, model, cap, tie_break, tie_tol):
    n = task.n
    steps = 2 * n + model.n_isolated if cap is None else cap
    positions = jnp.arange(1, n)[::-1]  # d = 1..n-1 -> a_{n-d}

    def one(position):
        return _walk(theta, n, model, position - 1, steps, tie_break, tie_tol)

    done, correct, length, traversed, tied, margin = jax.vmap(one)(positions)
    return GreedyPerStart(correct & done, done, traversed, length, tied, margin)


def greedy_per_start(
    theta: Theta,
    task: ChainTask,
    model: ModelSpec,
    max_len: int | None = None,
    tie_break: str = "first",
    tie_tol: float = DEFAULT_TIE_TOL,
) -> GreedyPerStart:
    """Greedy outcome of every start distance d (entry d-1); see the module docstring for the rules.

    Args:
        theta: the attention scores.
        task: the chain task.
        model: the model (context "prompt").
        max_len: the cap on tokens (default: ``model.max_len``; None for no cap).
        tie_break: "first" or "last": which of exactly tied vertices the path takes.
        tie_tol: the relative logit gap within which two vertices count as tied.

    Returns:
        A ``GreedyPerStart`` of arrays of shape (n-1,), entry d-1 for start distance d.

    Raises:
        ValueError: the context is not "prompt", tie_break is unknown, or max_len is not an integer >= 1.
    """
    cap = _resolve(model, max_len, tie_break)
    return _greedy_per_start(theta, task, model, cap, tie_break, float(tie_tol))


def greedy_metrics(
    theta: Theta,
    task: ChainTask,
    model: ModelSpec,
    max_len: int | None = None,
    tie_break: str = "first",
    tie_tol: float = DEFAULT_TIE_TOL,
) -> GreedyMetrics:
    """Start-weighted greedy accuracy, conditional accuracy, reach rate, traversal accuracy, tie rate.

    Args:
        theta: the attention scores.
        task: the chain task (its start probabilities weigh the starts).
        model: the model (context "prompt").
        max_len: the cap on tokens (default: ``model.max_len``; None for no cap).
        tie_break: "first" or "last": which of exactly tied vertices the path takes.
        tie_tol: the relative logit gap within which two vertices count as tied.

    Returns:
        ``GreedyMetrics``: the start-weighted metrics and the ``GreedyPerStart`` they come from.

    Raises:
        ValueError: the context is not "prompt", tie_break is unknown, or max_len is not an integer >= 1.
    """
    per = greedy_per_start(theta, task, model, max_len, tie_break, tie_tol)
    return _summarise(per, task.start_probs)


def _summarise(per: GreedyPerStart, probs) -> GreedyMetrics:
    weigh = lambda x: jnp.sum(probs * x.astype(float))
    accuracy, reach = weigh(per.correct), weigh(per.reached)
    conditional = jnp.where(reach > 0, accuracy / jnp.where(reach > 0, reach, 1.0), jnp.nan)
    return GreedyMetrics(accuracy, conditional, reach, weigh(per.traversed), weigh(per.tied), per)


def greedy_path(
    theta: Theta, task: ChainTask, model: ModelSpec, distance: int, max_len: int | None = None, tie_break: str = "first"
) -> list[str]:
    """The greedy path from the start at distance ``distance`` as vertex names (for reading, not jit).

    Stops at the first terminal, at the cap, or after 2n + n_isolated tokens without a cap (a cycle).

    Args:
        theta: the attention scores.
        task: the chain task (its n).
        model: the model (context "prompt").
        distance: the start's distance d to the terminal, 1..n-1 (the start is a_{n-d}).
        max_len: the cap on tokens (default: ``model.max_len``; None for no cap).
        tie_break: "first" or "last": which of exactly tied vertices the path takes.

    Returns:
        The names of the vertices written, in order (``gradflow.model.vertex_names``).

    Raises:
        ValueError: the context is not "prompt", tie_break is unknown, max_len is not an integer >= 1, or
            distance is not in 1..n-1.
    """
    cap = _resolve(model, max_len, tie_break)
    n = task.n
    check_int("distance", distance, 1)
    if distance > n - 1:
        raise ValueError(f"distance must lie in 1..{n - 1}, got {distance}")
    names = vertex_names(n, model.n_isolated)
    start = n - distance - 1
    u, path, rows = start, [], _rows_from(theta, n, model, start)
    for _ in range(2 * n + model.n_isolated if cap is None else cap):
        v, _, _ = _choose(rows(u), n, tie_break, DEFAULT_TIE_TOL)
        u = int(v)
        path.append(names[u])
        if u in (n - 1, 2 * n - 1):
            break
    return path
