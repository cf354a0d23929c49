"""The one-layer attention policy over vertices, in the five symmetric numbers of docs/THEORY.md §2.

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
import numpy as np

from gradflow._checks import as_float_array, check_choice, check_int, check_positive

ATTENTION_KINDS = ("linear", "softmax")
CONTEXTS = ("prompt", "history")



class ModelSpec(eqx.Module):
    """Structural choices of the policy (static) and its temperature ``tau`` (traced).

    attention: "linear" (logit = sum of raw attention scores, default) or "softmax" (scores are
    softmax-normalised over the context tokens).  mask_self: the current vertex cannot be written
    (the walk moves every step).  n_isolated: extra vertices with no edges in the vocabulary.
    context: what the token-level model attends to; "prompt" (edges + start token, the closed form)
    or "history" (also every generated vertex; not Markov for softmax, token-level sampling only).
    max_len: None (rollouts run until a terminal, default) or the maximum number of generated tokens
    (an int >= 1; self-loops count): reward 1 iff the start's own terminal is written within max_len
    tokens (docs/THEORY.md §7; closed form in ``gradflow.capped``).
    """

    attention: str = eqx.field(static=True, default="linear")
    tau: jnp.ndarray = eqx.field(converter=as_float_array, default=0.2)
    mask_self: bool = eqx.field(static=True, default=True)
    n_isolated: int = eqx.field(static=True, default=0)
    context: str = eqx.field(static=True, default="prompt")
    max_len: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_len is not None:
            check_int("max_len", self.max_len, 1)
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_positive("tau", self.tau)
        check_int("n_isolated", self.n_isolated, 0)
        check_choice("context", self.context, CONTEXTS)
        if not isinstance(self.mask_self, bool):
            raise ValueError(f"mask_self must be True or False, got {self.mask_self!r}")


class Theta(eqx.Module):
    """The five attention numbers (alpha, beta, gamma, eta, delta); a pytree for grad/jit/vmap."""

    alpha: jnp.ndarray = eqx.field(converter=as_float_array)
    beta: jnp.ndarray = eqx.field(converter=as_float_array)
    gamma: jnp.ndarray = eqx.field(converter=as_float_array)
    eta: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0)
    delta: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0)

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


def default_theta0() -> Theta:
    """The default start of every flow and training run: Theta(0.3, 0, 0) (alpha > 0, the rest 0)."""
    return Theta(0.3, 0.0, 0.0)


def vocabulary_size(n, model: ModelSpec, n_vocab: int | None = None) -> int:
    """N, the number of vertex tokens: ``n_vocab`` when given, else 2n + n_isolated.

    ``n`` is the chain length or a ChainTask (its ``n`` is used).
    """
    n = check_int("n", getattr(n, "n", n), 2)
    if n_vocab is not None:
        return check_int("n_vocab", n_vocab, 2 * n + model.n_isolated)
    return 2 * n + model.n_isolated


def orbit_labels(n_vocab: int) -> np.ndarray:
    """Kind k of every entry A[u, c] (0..4 = alpha, beta, gamma, eta, delta), shape (N, N^2).

    Columns: the N vertex tokens, then the N(N-1) edge tokens (x, y), x != y, in row-major order
    (column N + x (N-1) + y - [y > x]).  A numpy array (built on call, never at import).
    """
    check_int("n_vocab", n_vocab, 2)
    u = np.arange(n_vocab)[:, None]
    w = np.arange(n_vocab)[None, :]
    vertex = np.where(u == w, 3, 4)
    x, y = np.nonzero(~np.eye(n_vocab, dtype=bool))  # row-major
    edge = np.where(x[None, :] == u, 0, np.where(y[None, :] == u, 1, 2))
    return np.concatenate([vertex, edge], axis=1)


def orbit_sizes(n_vocab: int) -> jnp.ndarray:
    """Entries per query row of the full A that share each of the five numbers (docs/THEORY.md §4.2):
    (N-1, N-1, (N-1)(N-2), 1, N-1) for (alpha, beta, gamma, eta, delta)."""
    big_n = check_int("n_vocab", n_vocab, 2)
    return jnp.array([big_n - 1, big_n - 1, (big_n - 1) * (big_n - 2), 1, big_n - 1], dtype=float)


def _chain_length(task) -> int:
    """``task.n`` for a ChainTask, or the int itself (the old ``n`` argument)."""
    return check_int("n", getattr(task, "n", task), 2)


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
    has_in = pos >= 2
    is_start = jnp.zeros(shape, dtype=bool)
    if start is not None:
        is_start = is_start.at[0, start - 1].set(True)
    # log Z(u) by log-sum-exp (no overflow at any theta); far edges: n_edges - 1 - [has in-edge]
    n_far = (n_edges - 1 - has_in).astype(float)
    log_far = jnp.where(n_far > 0, theta.gamma + jnp.log(jnp.maximum(n_far, 1.0)), -jnp.inf)
    log_in = jnp.where(has_in, theta.beta, -jnp.inf)
    vertex = jnp.where(is_start, theta.eta, theta.delta)
    terms = jnp.broadcast_arrays(theta.alpha, log_in, log_far, vertex)
    log_z = jax.nn.logsumexp(jnp.stack(terms, axis=-1), axis=-1)
    log_z_iso = jnp.logaddexp(theta.gamma + jnp.log(float(n_edges)), theta.delta)
    inv_tau = 1.0 / model.tau
    return RowScores(
        jnp.exp(theta.alpha - log_z) * inv_tau,
        jnp.exp(theta.beta - log_z) * inv_tau,
        jnp.exp(theta.gamma - log_z) * inv_tau,
        jnp.exp(theta.gamma - log_z_iso) * inv_tau,
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
    """docs/THEORY.md §2.2: succ a+g[i+1<=n-1], self a+b[i>=2], pred b+g[i>=3], far vertex g*deg(v).

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


class RowLogits(NamedTuple):
    """Log-weights (logits) of the chain rows a_i, i = 1..n-1, for the accurate solves.

    Each array field broadcasts to the rows (linear attention: (n-1,); softmax: (2, n-1), chain a /
    chain b).  ``succ``, ``self_``, ``pred``: logits of a_{i+1}, a_i, a_{i-1} (finite dummies where
    absent: see ``has_pred`` and ``self_present``); ``base_*``: the far-vertex logit g * deg(v) those
    vertices would get; ``g``: the row's far logit per edge end (degree-2 vertices get 2g);
    ``g_iso``: the same for an isolated query vertex.  ``deg1_*``: the vertex has degree 1 (a chain
    end).  Static: ``n``, ``n_isolated``.
    """

    succ: jnp.ndarray
    self_: jnp.ndarray
    pred: jnp.ndarray
    base_succ: jnp.ndarray
    base_self: jnp.ndarray
    base_pred: jnp.ndarray
    g: jnp.ndarray
    g_iso: jnp.ndarray
    has_pred: jnp.ndarray
    deg1_succ: jnp.ndarray
    deg1_self: jnp.ndarray
    deg1_pred: jnp.ndarray
    self_present: bool
    n: int
    n_isolated: int


def row_logits(scores: RowScores, n: int, model: ModelSpec) -> RowLogits:
    """docs/THEORY.md §2.2 in logits: succ a+g[i+1<=n-1], self a+b[i>=2], pred b+g[i>=3], far vertex g*deg(v)."""
    pos = jnp.arange(1, n)
    a, b, g = scores.alpha, scores.beta, scores.gamma
    has_pred = pos >= 2
    deg1_succ, deg1_self, deg1_pred = pos + 1 == n, pos == 1, pos - 1 == 1
    return RowLogits(
        succ=a + jnp.where(deg1_succ, 0.0, g),
        self_=a + jnp.where(has_pred, b, 0.0),
        pred=b + jnp.where(pos >= 3, g, 0.0),
        base_succ=jnp.where(deg1_succ, g, 2.0 * g),
        base_self=jnp.where(deg1_self, g, 2.0 * g),
        base_pred=jnp.where(deg1_pred, g, 2.0 * g),
        g=g + jnp.zeros_like(pos, dtype=float),
        g_iso=scores.isolated,
        has_pred=has_pred,
        deg1_succ=deg1_succ,
        deg1_self=deg1_self,
        deg1_pred=deg1_pred,
        self_present=not model.mask_self,
        n=n,
        n_isolated=model.n_isolated,
    )


def log_sum(terms) -> jnp.ndarray:
    """log(sum_j count_j * exp(logit_j)) for (logit, count) pairs, counts >= 0 (arrays or numbers).

    A term with count 0 contributes nothing (and no gradient); the maximum is taken over present terms.
    """
    logits, counts = [], []
    for logit, count in terms:
        logit, count = jnp.broadcast_arrays(jnp.asarray(logit, float), jnp.asarray(count, float))
        logits.append(logit)
        counts.append(count)
    logits, counts = jnp.broadcast_arrays(*logits), jnp.broadcast_arrays(*counts)
    logits, counts = jnp.stack(logits, -1), jnp.stack(counts, -1)
    present = counts > 0
    top = jax.lax.stop_gradient(jnp.max(jnp.where(present, logits, -jnp.inf), axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    scaled = jnp.where(present, counts * jnp.exp(jnp.where(present, logits, top) - top), 0.0)
    return jnp.log(jnp.sum(scaled, axis=-1)) + top[..., 0]


def row_log_total(rows: RowLogits, include_self: bool) -> dict:
    """log of the row's weight groups: "local" pieces and the far groups, for probabilities by exp(l - log Z).

    Returns a dict of logs: total (Z), switch (all of chain b), jump (chain a minus the three local
    vertices), isolated (n_isolated weight-1 vertices; -inf when there are none).
    """
    n, m = rows.n, rows.n_isolated
    g = rows.g
    one = jnp.ones_like(g)
    d1 = lambda flag: jnp.where(flag, 1.0, 0.0)
    # chain a far weights except the local vertices present in the row (self always, pred if i >= 2)
    n1 = 2.0 - d1(rows.deg1_succ) - d1(rows.deg1_self) - d1(rows.has_pred & rows.deg1_pred)
    n2 = (n - 2.0) - (1 - d1(rows.deg1_succ)) - (1 - d1(rows.deg1_self)) - d1(rows.has_pred & ~rows.deg1_pred)
    jump = log_sum([(g, n1), (2.0 * g, n2)])
    switch = log_sum([(g, 2.0 * one), (2.0 * g, (n - 2.0) * one)])
    total_terms = [(rows.succ, one), (rows.pred, d1(rows.has_pred)), (g, n1 + 2.0), (2.0 * g, n2 + (n - 2.0))]
    if include_self:
        total_terms.append((rows.self_, one))
    if m:
        total_terms.append((jnp.zeros_like(g), m * one))
    return {
        "total": log_sum(total_terms),
        "switch": switch,
        "jump": jnp.where(n1 + n2 > 0, jump, -jnp.inf),
        "isolated": jnp.full_like(g, jnp.log(m) if m else -jnp.inf),
    }


class StepProbabilities(NamedTuple):
    """Next-vertex probabilities from a_i, i = 1..n-1 (each shape (n-1,), they sum to 1).

    forward: to a_{i+1}; backward: to a_{i-1}; stay: the self-loop a_i -> a_i (0 under mask_self);
    switch: to any b vertex; jump: to a non-adjacent vertex of chain a; isolated: to an isolated vertex.
    ``self`` is the old name of ``stay`` (kept as an alias).
    """

    forward: jnp.ndarray
    backward: jnp.ndarray
    stay: jnp.ndarray
    switch: jnp.ndarray
    jump: jnp.ndarray
    isolated: jnp.ndarray
    move: jnp.ndarray = None

    @property
    def self(self) -> jnp.ndarray:  # noqa: D401  (alias)
        """Alias of ``stay`` (the field's old name)."""
        return self.stay

    @property
    def forward_given_move(self) -> jnp.ndarray:
        """P(forward | the walk leaves a_i) = forward / P(move), P(move) summed, never 1 - stay."""
        move = self.move if self.move is not None else self.forward + self.backward + self.switch + self.jump + self.isolated
        return self.forward / move


@eqx.filter_jit
def step_probabilities(theta: Theta, task, model: ModelSpec) -> StepProbabilities:
    """Per-position step probabilities on chain a (softmax: rows of vertices that are not the start).

    ``task``: a ChainTask or the chain length n.  Each probability is exp(logit - log Z) with log Z by
    log-sum-exp, so they are accurate to relative round-off at any theta/tau.
    """
    n = _chain_length(task)
    rows = row_logits(row_scores(theta, n, model), n, model)
    if model.attention != "linear":
        rows = rows._replace(**{f: jnp.broadcast_to(getattr(rows, f), (2, n - 1))[0] for f in RowLogits._fields[:8]})
    logs = row_log_total(rows, include_self=not model.mask_self)
    log_z = logs["total"]
    prob = lambda log_w: jnp.exp(log_w - log_z)
    stay = prob(rows.self_) if not model.mask_self else jnp.zeros(n - 1)
    local_move = jnp.stack([rows.succ, jnp.where(rows.has_pred, rows.pred, -jnp.inf), logs["switch"], logs["jump"], logs["isolated"]], -1)
    log_move = jax.nn.logsumexp(local_move, axis=-1)
    return StepProbabilities(
        forward=prob(rows.succ),
        backward=jnp.where(rows.has_pred, prob(jnp.where(rows.has_pred, rows.pred, 0.0)), 0.0),
        stay=stay,
        switch=prob(logs["switch"]),
        jump=prob(logs["jump"]),
        isolated=prob(logs["isolated"]),
        move=prob(log_move),
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
def transition_matrix(theta: Theta, task, model: ModelSpec, start: int | None = None) -> jnp.ndarray:
    """Dense next-vertex probabilities P[u, v], built token by token from the edge list.

    logit[u, v] = (1/tau) sum_{edges e containing v} w[u, e], w[u, e] in {alpha, beta, gamma} by how
    e touches u (softmax: normalised with the start vertex token).  ``start`` is the start's position
    on chain a (softmax only: that row attends to its own token with eta); rows of terminals are
    computed like any other (the walk stops there).  ``task``: a ChainTask or the chain length n.
    """
    n = _chain_length(task)
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
