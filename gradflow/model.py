"""The one-layer attention policy over vertices, in the five symmetric numbers of THEORY.md section 2.

For a query vertex u the trained attention row A[u, .] takes five values by the relation of the
context token to u: alpha (edge u->w), beta (edge w->u), gamma (edge not touching u), eta (the vertex
token u), delta (another vertex token).  The value matrix is fixed: an edge (x, y) writes 1 on x and
y, a vertex token writes 0.  The next-vertex logits are (1/tau) * sum_j weight_j * V[c_j, v].
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from gradflow._checks import check_choice, check_int, check_positive

ATTENTION_KINDS = ("linear", "softmax")
CONTEXTS = ("prompt", "history")


def _as_float_array(x) -> jnp.ndarray:
    return jnp.asarray(x, dtype=float)


class ModelSpec(eqx.Module):
    """Structural choices of the policy (static) and its temperature ``tau`` (traced).

    attention: "linear" (logit = sum of raw attention scores, default) or "softmax" (scores are
    softmax-normalised over the context tokens).  mask_self: the current vertex cannot be written
    (the walk moves every step).  n_isolated: extra vertices with no edges in the vocabulary.
    context: what the token-level model attends to; "prompt" (edges + start token, the closed form)
    or "history" (also every generated vertex; not Markov for softmax, token-level sampling only).
    """

    attention: str = eqx.field(static=True, default="linear")
    tau: jnp.ndarray = eqx.field(converter=_as_float_array, default=0.2)
    mask_self: bool = eqx.field(static=True, default=True)
    n_isolated: int = eqx.field(static=True, default=0)
    context: str = eqx.field(static=True, default="prompt")

    def __check_init__(self):
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_positive("tau", self.tau)
        check_int("n_isolated", self.n_isolated, 0)
        check_choice("context", self.context, CONTEXTS)
        if not isinstance(self.mask_self, bool):
            raise ValueError(f"mask_self must be True or False, got {self.mask_self!r}")


class Theta(eqx.Module):
    """The five attention numbers (alpha, beta, gamma, eta, delta); a pytree for grad/jit/vmap."""

    alpha: jnp.ndarray = eqx.field(converter=_as_float_array)
    beta: jnp.ndarray = eqx.field(converter=_as_float_array)
    gamma: jnp.ndarray = eqx.field(converter=_as_float_array)
    eta: jnp.ndarray = eqx.field(converter=_as_float_array, default=0.0)
    delta: jnp.ndarray = eqx.field(converter=_as_float_array, default=0.0)

    def as_array(self) -> jnp.ndarray:
        """The numbers stacked on the last axis, in the order (alpha, beta, gamma, eta, delta)."""
        return jnp.stack([self.alpha, self.beta, self.gamma, self.eta, self.delta], axis=-1)

    @classmethod
    def from_array(cls, x) -> "Theta":
        """Inverse of ``as_array``: the last axis of ``x`` holds the five numbers."""
        x = jnp.asarray(x, dtype=float)
        if x.shape[-1:] != (5,):
            raise ValueError(f"theta array must have last axis of size 5, got shape {x.shape}")
        return cls(*(x[..., k] for k in range(5)))


class RowScores(NamedTuple):
    """Effective (alpha, beta, gamma)/tau seen by each query row after the attention map.

    ``chain`` entries broadcast to (2, n-1): chain a / chain b, positions i = 1..n-1 (linear
    attention: scalars, every row sees the same numbers).  ``isolated`` is the gamma/tau seen from an
    isolated query vertex (it attends only to far edges).
    """

    alpha: jnp.ndarray
    beta: jnp.ndarray
    gamma: jnp.ndarray
    isolated: jnp.ndarray


def row_scores(theta: Theta, n: int, model: ModelSpec, start: int | None = None) -> RowScores:
    """Per-row effective scores; for softmax, ``start`` (position on chain a, 1..n-1) gets eta.

    linear: (alpha, beta, gamma)/tau for every row.  softmax: exp(score)/Z(u)/tau with
    Z(u) = e^alpha [u has out-edge] + e^beta [u has in-edge] + e^gamma (#far edges) + e^{eta or delta}.
    """
    if model.attention == "linear":
        return RowScores(theta.alpha / model.tau, theta.beta / model.tau, theta.gamma / model.tau, theta.gamma / model.tau)
    pos = jnp.arange(1, n)
    shape = (2, n - 1)
    n_edges = 2 * (n - 1)
    has_in = (pos >= 2).astype(float)
    is_start = jnp.zeros(shape).at[0, start - 1].set(1.0) if start is not None else jnp.zeros(shape)
    vertex_term = is_start * jnp.exp(theta.eta) + (1.0 - is_start) * jnp.exp(theta.delta)
    z = jnp.exp(theta.alpha) + has_in * jnp.exp(theta.beta) + (n_edges - 1 - has_in) * jnp.exp(theta.gamma)
    z = z + vertex_term
    z_iso = n_edges * jnp.exp(theta.gamma) + jnp.exp(theta.delta)
    scale = 1.0 / (z * model.tau)
    return RowScores(
        jnp.exp(theta.alpha) * scale,
        jnp.exp(theta.beta) * scale,
        jnp.exp(theta.gamma) * scale,
        jnp.exp(theta.gamma) / (z_iso * model.tau),
    )


class LocalRows(NamedTuple):
    """Weights (exp of logits) of each chain row: the three local targets and the far baseline.

    ``succ``, ``self_``, ``pred``: actual weights of a_{i+1}, a_i (0 when masked), a_{i-1} (0 at i=1).
    ``base_succ`` etc.: the weight the far-vertex formula exp(gamma*deg) would give those targets, so
    that row weights = far baseline on every vertex + (actual - baseline) on the three local ones.
    ``far1``, ``far2``: the baseline weights exp(gamma), exp(2 gamma) of degree-1 and degree-2 vertices.
    """

    succ: jnp.ndarray
    self_: jnp.ndarray
    pred: jnp.ndarray
    base_succ: jnp.ndarray
    base_self: jnp.ndarray
    base_pred: jnp.ndarray
    far1: jnp.ndarray
    far2: jnp.ndarray


def local_rows(scores: RowScores, n: int, model: ModelSpec) -> LocalRows:
    """THEORY.md 2: succ a+g[i+1<=n-1], self a+b[i>=2], pred b+g[i>=3], far vertex g*deg(v).

    Three exponentials per distinct score (one each for linear attention), combined by masks.  Each
    field broadcasts to (2, n-1) (linear attention: (n-1,) or a scalar, the chains are alike).
    """
    pos = jnp.arange(1, n)
    e_a, e_b, e_g = jnp.exp(scores.alpha), jnp.exp(scores.beta), jnp.exp(scores.gamma)
    e_g2 = e_g * e_g
    has_pred = pos >= 2
    far_weight = lambda idx: jnp.where((idx == 1) | (idx == n), e_g, e_g2)  # exp(gamma deg(v))
    return LocalRows(
        succ=e_a * jnp.where(pos + 1 <= n - 1, e_g, 1.0),
        self_=jnp.where(has_pred, e_a * e_b, e_a) * (0.0 if model.mask_self else 1.0),
        pred=jnp.where(has_pred, e_b * jnp.where(pos >= 3, e_g, 1.0), 0.0),
        base_succ=far_weight(pos + 1),
        base_self=far_weight(pos),
        base_pred=jnp.where(has_pred, far_weight(pos - 1), 0.0),
        far1=e_g,
        far2=e_g2,
    )


def chain_a_rows(rows: LocalRows, n: int) -> LocalRows:
    """The rows of chain a (positions 1..n-1): every field of ``rows`` as an (n-1,) array."""
    return LocalRows(*(jnp.broadcast_to(x, (2, n - 1))[0] for x in rows))


def row_normaliser(rows: LocalRows, n: int, model: ModelSpec) -> jnp.ndarray:
    """Z(u) = sum over all vertices of the row weights: 4 degree-1 + (2n-4) degree-2 + isolated + local."""
    local = (rows.succ - rows.base_succ) + (rows.self_ - rows.base_self) + (rows.pred - rows.base_pred)
    return 4.0 * rows.far1 + (2 * n - 4) * rows.far2 + model.n_isolated + local


class StepProbabilities(NamedTuple):
    """Next-vertex probabilities from a_i, i = 1..n-1 (each shape (n-1,), they sum to 1).

    forward: to a_{i+1}; backward: to a_{i-1}; self: stay at a_i; switch: to any b vertex;
    jump: to a non-adjacent vertex of chain a; isolated: to an isolated vertex.
    """

    forward: jnp.ndarray
    backward: jnp.ndarray
    self: jnp.ndarray
    switch: jnp.ndarray
    jump: jnp.ndarray
    isolated: jnp.ndarray

    @property
    def forward_given_move(self) -> jnp.ndarray:
        """P(forward | the walk leaves a_i) = forward / (1 - self)."""
        return self.forward / (1.0 - self.self)


@eqx.filter_jit
def step_probabilities(theta: Theta, n: int, model: ModelSpec) -> StepProbabilities:
    """Per-position step probabilities on chain a (softmax: rows of vertices that are not the start)."""
    check_int("n", n, 2)
    rows = chain_a_rows(local_rows(row_scores(theta, n, model), n, model), n)
    z = row_normaliser(rows, n, model)
    chain_total = 2.0 * rows.far1 + (n - 2) * rows.far2
    jump = chain_total - rows.base_succ - rows.base_self - rows.base_pred
    return StepProbabilities(
        forward=rows.succ / z,
        backward=rows.pred / z,
        self=rows.self_ / z,
        switch=chain_total / z,
        jump=jump / z,
        isolated=model.n_isolated / z,
    )


def vertex_names(n: int, n_isolated: int = 0) -> list[str]:
    """Vertex order of every dense matrix: a_1..a_n, b_1..b_n, then i_1..i_m."""
    return [f"a{i}" for i in range(1, n + 1)] + [f"b{i}" for i in range(1, n + 1)] + [
        f"i{k}" for k in range(1, n_isolated + 1)
    ]


def edge_list(n: int) -> list[tuple[int, int]]:
    """The 2(n-1) directed edges (x, y) as vertex indices in ``vertex_names`` order."""
    return [(c * n + i, c * n + i + 1) for c in range(2) for i in range(n - 1)]


@eqx.filter_jit
def transition_matrix(theta: Theta, n: int, model: ModelSpec, start: int | None = None) -> jnp.ndarray:
    """Dense next-vertex probabilities P[u, v], built token by token from the edge list.

    logit[u, v] = (1/tau) sum_{edges e containing v} w[u, e], w[u, e] in {alpha, beta, gamma} by how
    e touches u (softmax: normalised with the start vertex token).  ``start`` is the start's position
    on chain a (softmax only: that row attends to its own token with eta); rows of terminals are
    computed like any other (the walk stops there).
    """
    check_int("n", n, 2)
    n_vertices = 2 * n + model.n_isolated
    edges = jnp.asarray(edge_list(n))
    u = jnp.arange(n_vertices)[:, None]
    score = jnp.where(edges[None, :, 0] == u, theta.alpha, jnp.where(edges[None, :, 1] == u, theta.beta, theta.gamma))
    if model.attention == "softmax":
        start_vertex = -1 if start is None else start - 1
        vertex_score = jnp.where(jnp.arange(n_vertices) == start_vertex, theta.eta, theta.delta)[:, None]
        weights = jax.nn.softmax(jnp.concatenate([score, vertex_score], axis=1), axis=1)[:, :-1]
    else:
        weights = score
    incidence = jax.nn.one_hot(edges[:, 0], n_vertices) + jax.nn.one_hot(edges[:, 1], n_vertices)
    logits = weights @ incidence / model.tau
    if model.mask_self:
        logits = jnp.where(jnp.eye(n_vertices, dtype=bool), -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=1)
