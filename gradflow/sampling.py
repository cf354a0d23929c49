"""Token-level sampling: what practice does with the five numbers (docs/THEORY.md §2, §4 and §6).

The closed form of ``gradflow.objective`` is checked here against the model it abstracts: a full
attention matrix over a vocabulary of vertex and edge tokens, random vertex labels per instance,
one-hot tokens, and a chain of thought generated token by token until the first terminal (or the
cap: ``resolve_max_len``; with ``ModelSpec(max_len=...)`` the rollouts are the capped rollouts of
``gradflow.capped``).

Vocabulary of ``n_vocab = N`` vertex tokens: columns 0..N-1 of A are the vertex tokens, then the
N(N-1) edge tokens (x, y), x != y, in row-major order with the diagonal left out:
column(x, y) = N + x (N-1) + y - [y > x].  Rows are query vertex tokens.

Inside an instance every vertex has a canonical index (``gradflow.model.vertex_names`` order:
a_1..a_n, b_1..b_n, the n_isolated isolated vertices, then the vocabulary tokens this instance does
not use, which behave like further isolated vertices); ``labels[k]`` is the vocabulary token of
canonical vertex k, a uniformly random permutation.  The start is always on chain a: with random
labels this loses no generality.

Policy gradient: REINFORCE, grad J = E[(R - b) grad log p(path)], with the leave-one-out baseline
b_i = mean of the other rewards of the batch; b_i does not depend on sample i, so the estimate is
exactly unbiased.  A path is scored by replaying it (the sampled tokens are constants) through a
differentiable log-probability, so the same code differentiates w.r.t. the five numbers (through
``full_attention``) or w.r.t. the full matrix A.

The two-matrix model (``ModelSpec(values="trained")``, docs/THEORY.md §10) passes its full value matrix
V (``full_values``) next to A: logit(w) = (1/tau) sum_j w_j V[c_j, w] over the context tokens, the
context being the prompt plus the current vertex's token counted once ("prompt"), or the prompt plus
every generated vertex with repeats ("history", not Markov).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import check_int
from gradflow._deprecated import module_getattr
from gradflow.model import ModelSpec, Theta, edge_list, orbit_labels, value_labels
from gradflow.task import ChainTask

# --------------------------------------------------------------------------------------------------
# The vocabulary and the full attention matrix
# --------------------------------------------------------------------------------------------------


def edge_column(x, y, n_vocab: int):
    """Column of edge token (x, y), x != y: N + x (N-1) + y - [y > x].

    Args:
        x (int | jax.Array): the edge's first vertex token.
        y (int | jax.Array): its second vertex token (!= x).
        n_vocab: the vocabulary size N.

    Returns:
        column (int | jax.Array): the column index in the attention matrix (same shape as x and y).
    """
    return n_vocab + x * (n_vocab - 1) + y - (y > x)


def full_attention(theta: Theta, n_vocab: int) -> jnp.ndarray:
    """A[u, c] = theta_k for the kind k of token c relative to query u; shape (N, N + N(N-1)).

    Args:
        theta: the attention scores.
        n_vocab: the vocabulary size N.

    Returns:
        The full attention matrix A.
    """
    return theta.as_array()[orbit_labels(n_vocab)]


def full_values(theta: Theta, n_vocab: int) -> jnp.ndarray:
    """V[c, w] = (sigma, rho, omega, mu, nu)_k for the kind k of vertex w relative to token c; shape (N^2, N).

    Rows: the tokens in A's column order (N vertex tokens, then the edge tokens); columns: the vertices.

    Args:
        theta: the parameters (its V numbers).
        n_vocab: the vocabulary size N.

    Returns:
        The full value matrix V.
    """
    return jnp.stack([theta.sigma, theta.rho, theta.omega, theta.mu, theta.nu])[value_labels(n_vocab)]


def _values_of(theta: Theta, n_vocab: int, model: ModelSpec):
    """The full V of a two-matrix model, None for the fixed V (the incidence of the prompt's edges)."""
    return full_values(theta, n_vocab) if model.values == "trained" else None


def orbit_statistics(A: jnp.ndarray, V: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and standard deviation of A over the entries of each kind: two arrays of length ``Theta.size()``;
    with the full V too (``full_values``), of length ``Theta.size("trained")`` (A's five, then V's five)."""
    stats = [_kind_statistics(A, orbit_labels(A.shape[0]))]
    if V is not None:
        stats.append(_kind_statistics(V, value_labels(V.shape[1])))
    return tuple(jnp.concatenate(parts) for parts in zip(*stats)) if V is not None else stats[0]


def _kind_statistics(x: jnp.ndarray, labels: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and standard deviation of the entries of x of each kind 0..4 (``labels``, x's shape)."""
    kinds = labels.reshape(-1)
    n_kinds = Theta.size()
    counts = np.bincount(kinds, minlength=n_kinds).astype(float)
    mean = jax.ops.segment_sum(x.reshape(-1), kinds, n_kinds) / counts
    var = jax.ops.segment_sum((x.reshape(-1) - mean[kinds]) ** 2, kinds, n_kinds) / counts
    return mean, jnp.sqrt(var)


# --------------------------------------------------------------------------------------------------
# Instances and one step of the policy
# --------------------------------------------------------------------------------------------------


class Instances(NamedTuple):
    """A batch of labelled instances (leading axis: batch).

    labels[k]: vocabulary token of canonical vertex k (shape (N,)); edge_columns: the A-columns of
    the 2(n-1) prompt edges in ``edge_list`` order; start: canonical start a_{n-d} (= n-d-1);
    distances: d.
    """

    labels: jnp.ndarray
    edge_columns: jnp.ndarray
    start: jnp.ndarray
    distances: jnp.ndarray


def sample_instances(task: ChainTask, n_vocab: int, key, batch: int) -> Instances:
    """Random injective labels (argsort of uniforms) and d ~ start_probs (inverse CDF), one draw each.

    Args:
        task: the chain task (its n and start distribution).
        n_vocab: the vocabulary size N.
        key (jax.Array): the jax.random key.
        batch: the number of instances.

    Returns:
        ``Instances``: labels (batch, N), the prompt's edge columns, the start vertex and d per instance.
    """
    uniforms = jax.random.uniform(key, (batch, n_vocab + 1))
    labels = jnp.argsort(uniforms[:, :n_vocab], axis=1)
    edges = np.asarray(edge_list(task.n))
    edge_columns = edge_column(labels[:, edges[:, 0]], labels[:, edges[:, 1]], n_vocab)
    distances = 1 + _inverse_cdf(task.start_probs, uniforms[:, n_vocab])
    return Instances(labels, edge_columns, task.n - distances - 1, distances)


def _inverse_cdf(probs, uniform) -> jnp.ndarray:
    """Index k with cdf[k-1] <= uniform * total < cdf[k] (probs on the last axis, zeros never drawn)."""
    cdf = jnp.cumsum(probs, axis=-1)
    below = cdf <= (uniform * cdf[..., -1])[..., None]
    return jnp.minimum(jnp.sum(below, axis=-1), probs.shape[-1] - 1)


def _incidence(n: int, n_vocab: int) -> np.ndarray:
    """V restricted to the prompt edges, canonical vertices: V[e, v] = [v is an end of edge e]."""
    edges = np.asarray(edge_list(n))
    return np.eye(n_vocab)[edges[:, 0]] + np.eye(n_vocab)[edges[:, 1]]


def next_log_probs(A, labels, edge_columns, u, counts, n: int, model: ModelSpec, V=None) -> jnp.ndarray:
    """log p(v | query u) over canonical vertices v for one instance; logit = (1/tau) sum_j w_j V[c_j, v].

    linear: w_j = A[u, c_j].  softmax: w_j = exp A[u, c_j] / Z over the context, where the context
    holds the prompt edges and ``counts[k]`` copies of the vertex token of canonical vertex k.  With a
    trained V (``V`` given) the vertex tokens write on the logits too, and the prompt context also holds
    u's token (counted once).

    Args:
        A (jax.Array): the full attention matrix (``full_attention``).
        labels (jax.Array): the token of each canonical vertex, shape (N,).
        edge_columns (jax.Array): the columns of the prompt's edge tokens.
        u (int | jax.Array): the canonical query vertex.
        counts (jax.Array): copies of each canonical vertex's token in the context, shape (N,).
        n: the chain length.
        model: the model (attention, tau, mask_self, context).
        V (jax.Array | None): the full value matrix (``full_values``); None: the fixed V.

    Returns:
        The log-probabilities, shape (N,).
    """
    if V is not None:
        return _two_matrix_log_probs(A, V, labels, edge_columns, u, counts, model)
    token = labels[u]
    scores = A[token, edge_columns]
    if model.attention == "softmax":
        vertex_scores = A[token, labels]
        log_z = jax.nn.logsumexp(
            jnp.concatenate([scores, vertex_scores]),
            b=jnp.concatenate([jnp.ones_like(scores), counts]),
        )
        scores = jnp.exp(scores - log_z)
    logits = scores @ _incidence(n, A.shape[0]) / model.tau
    if model.mask_self:
        logits = jnp.where(jnp.arange(A.shape[0]) == u, -jnp.inf, logits)
    return jax.nn.log_softmax(logits)


def _two_matrix_log_probs(A, V, labels, edge_columns, u, counts, model: ModelSpec) -> jnp.ndarray:
    """``next_log_probs`` with the full value matrix V: context = the prompt's edges (once each) and the
    vertex tokens with their counts (prompt context: u's token added, counted once)."""
    n_vocab = A.shape[0]
    if model.context == "prompt":
        counts = jnp.maximum(counts, jax.nn.one_hot(u, n_vocab))
    columns = jnp.concatenate([edge_columns, labels])
    copies = jnp.concatenate([jnp.ones(edge_columns.shape), counts])
    scores = A[labels[u], columns]
    if model.attention == "softmax":
        scores = jnp.exp(scores - jax.nn.logsumexp(scores, b=copies))
    logits = (copies * scores) @ V[columns][:, labels] / model.tau
    if model.mask_self:
        logits = jnp.where(jnp.arange(n_vocab) == u, -jnp.inf, logits)
    return jax.nn.log_softmax(logits)


def _is_markov(model: ModelSpec) -> bool:
    """Next-token law depends on the current vertex only: prompt context, or linear attention with the
    fixed V (whose vertex tokens write nothing)."""
    return model.context == "prompt" or (model.attention == "linear" and model.values == "fixed")


def _initial_counts(start, n_vocab: int) -> jnp.ndarray:
    """Vertex tokens in the prompt: the start token once."""
    return jax.nn.one_hot(start, n_vocab)


def transition_log_probs(A, labels, edge_columns, start, n: int, model: ModelSpec, V=None) -> jnp.ndarray:
    """log P[u, v] for every canonical query u of one instance, prompt context; shape (N, N).

    Args:
        A (jax.Array): the full attention matrix (``full_attention``).
        labels (jax.Array): the token of each canonical vertex, shape (N,).
        edge_columns (jax.Array): the columns of the prompt's edge tokens.
        start (int | jax.Array): the canonical start vertex (its token is in the prompt once).
        n: the chain length.
        model: the model.
        V (jax.Array | None): the full value matrix (``full_values``); None: the fixed V.

    Returns:
        The log transition matrix, shape (N, N).
    """
    counts = _initial_counts(start, A.shape[0])
    return jax.vmap(lambda u: next_log_probs(A, labels, edge_columns, u, counts, n, model, V))(jnp.arange(A.shape[0]))


# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------


class Rollouts(NamedTuple):
    """Sampled chains of thought (leading axis: batch).

    paths: generated vocabulary tokens, (batch, max_len) int32, -1 after the end; rewards: 1 if the first
    terminal is the start's own; lengths: generated tokens incl. the terminal; log_probs: sum of
    log p of the generated tokens; truncated: no terminal within max_len (reward 0); distances: d;
    traversed: the path is exactly the forward path a_{n-d+1}..a_n; labels: token of each canonical
    vertex (see the module docstring).
    """

    paths: jnp.ndarray
    rewards: jnp.ndarray
    lengths: jnp.ndarray
    log_probs: jnp.ndarray
    truncated: jnp.ndarray
    distances: jnp.ndarray
    traversed: jnp.ndarray
    labels: jnp.ndarray


def default_max_len(n: int) -> int:
    """Default truncation: 50 n generated tokens (far beyond the expected length at sane theta)."""
    return 50 * n


def _step_log_probs(A, inst: Instances, n: int, model: ModelSpec, V=None):
    """(u, counts) -> log p(. | u, counts), batched; a table look-up when the walk is Markov."""
    if _is_markov(model):
        tables = jax.vmap(lambda lab, cols, s: transition_log_probs(A, lab, cols, s, n, model, V))(
            inst.labels, inst.edge_columns, inst.start
        )
        return lambda u, counts: jnp.take_along_axis(tables, u[:, None, None], axis=1)[:, 0]
    step = lambda lab, cols, u, c: next_log_probs(A, lab, cols, u, c, n, model, V)
    return lambda u, counts: jax.vmap(step)(inst.labels, inst.edge_columns, u, counts)


@eqx.filter_jit
def _rollouts(A, task: ChainTask, model: ModelSpec, key, batch: int, max_len: int, V=None) -> Rollouts:
    n, n_vocab = task.n, A.shape[0]
    key_inst, key_gen = jax.random.split(key)
    inst = sample_instances(task, n_vocab, key_inst, batch)
    log_probs_of = _step_log_probs(A, inst, n, model, V)
    history = 1.0 if model.context == "history" else 0.0

    def body(state):
        t, u, counts, done, reward, length, log_p, forward, paths = state
        step_log_probs = log_probs_of(u, counts)
        v = _inverse_cdf(jnp.exp(step_log_probs), jax.random.uniform(jax.random.fold_in(key_gen, t), (batch,)))
        active = ~done
        terminal = (v == n - 1) | (v == 2 * n - 1)
        token = jnp.take_along_axis(inst.labels, v[:, None], axis=1)[:, 0]
        chosen = jnp.take_along_axis(step_log_probs, v[:, None], axis=1)[:, 0]
        return (
            t + 1,
            jnp.where(active, v, u),
            counts + history * active[:, None] * jax.nn.one_hot(v, n_vocab),
            done | terminal,
            jnp.where(active & terminal, (v == n - 1).astype(float), reward),
            length + active,
            log_p + jnp.where(active, chosen, 0.0),
            forward & (done | (v == u + 1)),
            paths.at[:, t].set(jnp.where(active, token, -1).astype(paths.dtype)),
        )

    def cond(state):
        return (state[0] < max_len) & ~jnp.all(state[3])

    init = (
        jnp.asarray(0),
        inst.start,
        _initial_counts(inst.start, n_vocab),
        jnp.zeros(batch, bool),
        jnp.zeros(batch),
        jnp.zeros(batch, int),
        jnp.zeros(batch),
        jnp.ones(batch, bool),
        jnp.full((batch, max_len), -1, dtype=jnp.int32),
    )
    _, _, _, done, reward, length, log_p, forward, paths = jax.lax.while_loop(cond, body, init)
    return Rollouts(paths, reward, length, log_p, ~done, inst.distances, forward & done, inst.labels)


def _check_vocabulary(A, task: ChainTask, model: ModelSpec) -> None:
    n_vocab = A.shape[0]
    needed = 2 * task.n + model.n_isolated
    if n_vocab < needed:
        raise ValueError(f"n_vocab (rows of A) must be >= 2n + n_isolated = {needed}, got {n_vocab}")
    if A.shape != (n_vocab, n_vocab * n_vocab):
        raise ValueError(f"A must have shape (n_vocab, n_vocab^2) = ({n_vocab}, {n_vocab**2}), got {A.shape}")


def resolve_max_len(task: ChainTask, model: ModelSpec, max_len: int | None = None) -> int:
    """The rollout cap: ``max_len`` when given, else ``model.max_len`` when set, else ``default_max_len(n)``.

    ``default_max_len(n)`` is a truncation far beyond the expected length, for uncapped models.

    Args:
        task: the chain task (its n).
        model: the model (its max_len).
        max_len: an explicit cap.

    Returns:
        The cap, an integer >= 1.

    Raises:
        ValueError: the cap is not an integer >= 1.
    """
    if max_len is None:
        max_len = model.max_len if model.max_len is not None else default_max_len(task.n)
    return check_int("max_len", max_len, 1)


def rollouts(A, task: ChainTask, model: ModelSpec, key, batch: int, max_len: int | None = None, V=None) -> Rollouts:
    """Sample ``batch`` instances and generate until the first terminal (or ``max_len`` tokens).

    Step: p(v | u) = softmax_v[(1/tau) sum_j w_j(A[u, c_j]) V[c_j, v]] over all N vertex tokens,
    the current vertex masked if ``model.mask_self``.  A rollout with no terminal within the cap earns
    0 (``truncated``).

    Args:
        A (ArrayLike): the full attention matrix (``full_attention``).
        task: the chain task.
        model: the model.
        key (jax.Array): the jax.random key.
        batch: the number of rollouts, >= 1.
        max_len: the cap (``resolve_max_len``): the argument wins when given; else ``model.max_len``
            (the capped reward of ``gradflow.capped``); else ``default_max_len(n)``.
        V (ArrayLike | None): the full value matrix of a two-matrix model (``full_values``); None: the fixed V.

    Returns:
        The ``Rollouts`` (leading axis: batch).

    Raises:
        ValueError: batch or max_len is not an integer >= 1, or A's shape does not fit the vocabulary.
    """
    batch = check_int("batch", batch, 1)
    max_len = resolve_max_len(task, model, max_len)
    A = jnp.asarray(A, dtype=float)
    _check_vocabulary(A, task, model)
    V = _checked_values(V, A.shape[0], model)
    return _rollouts(A, task, model, key, batch, max_len, V)


def _checked_values(V, n_vocab: int, model: ModelSpec):
    """V as a float array of shape (N^2, N), required exactly when the model trains V."""
    if (V is None) != (model.values == "fixed"):
        raise ValueError(f"V (the full value matrix) must be given exactly when values='trained' (model: {model.values!r})")
    if V is None:
        return None
    V = jnp.asarray(V, dtype=float)
    if V.shape != (n_vocab * n_vocab, n_vocab):
        raise ValueError(f"V must have shape (n_vocab^2, n_vocab) = ({n_vocab**2}, {n_vocab}), got {V.shape}")
    return V


# --------------------------------------------------------------------------------------------------
# Differentiable replay and the REINFORCE estimates
# --------------------------------------------------------------------------------------------------


def path_log_prob(A, labels, path_tokens, start, n: int, model: ModelSpec, V=None) -> jnp.ndarray:
    """log p(path | A) = sum_t log p(v_t | v_{t-1}, context_t) for one instance, path padded with -1.

    Differentiable in A; the path is data.  Markov walks read a (N, N) table of log P[u, v]; softmax
    with history context evaluates every step in parallel.  No loop over tokens either way.

    Args:
        A (jax.Array): the full attention matrix (``full_attention``).
        labels (jax.Array): the token of each canonical vertex, shape (N,).
        path_tokens (jax.Array): the generated tokens, padded with -1.
        start (jax.Array): the canonical start vertex (a scalar array).
        n: the chain length.
        model: the model.
        V (jax.Array | None): the full value matrix (``full_values``); None: the fixed V.

    Returns:
        The scalar log-probability.
    """
    n_vocab = A.shape[0]
    canonical = jnp.argsort(labels)
    valid = path_tokens >= 0
    path = jnp.where(valid, canonical[jnp.maximum(path_tokens, 0)], 0)
    previous = jnp.concatenate([start[None], path[:-1]])
    edges = np.asarray(edge_list(n))
    edge_columns = edge_column(labels[edges[:, 0]], labels[edges[:, 1]], n_vocab)
    if _is_markov(model):
        chosen = transition_log_probs(A, labels, edge_columns, start, n, model, V)[previous, path]
    else:
        generated = jax.nn.one_hot(path, n_vocab) * valid[:, None]
        counts = _initial_counts(start, n_vocab) + jnp.cumsum(generated, axis=0) - generated
        log_probs = jax.vmap(lambda u, c: next_log_probs(A, labels, edge_columns, u, c, n, model, V))(previous, counts)
        chosen = jnp.take_along_axis(log_probs, path[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(valid, chosen, 0.0))


def _batch_log_probs(A, ro: Rollouts, n: int, model: ModelSpec, V=None) -> jnp.ndarray:
    """log p of every sampled path, shape (batch,), as a differentiable function of A (and V)."""
    start = n - ro.distances - 1
    return jax.vmap(lambda lab, p, s: path_log_prob(A, lab, p, s, n, model, V))(ro.labels, ro.paths, start)


def leave_one_out_advantage(rewards: jnp.ndarray) -> jnp.ndarray:
    """R_i - mean_{j != i} R_j = B/(B-1) (R_i - mean R); needs batch >= 2."""
    batch = rewards.shape[0]
    return (rewards - jnp.mean(rewards)) * batch / (batch - 1)


def surrogate(A, ro: Rollouts, n: int, model: ModelSpec, V=None) -> jnp.ndarray:
    """mean_i (R_i - b_i) log p(path_i | A): its gradient is the REINFORCE estimate of grad J.

    The baseline b_i is the leave-one-out mean (``leave_one_out_advantage``), held constant.

    Args:
        A (jax.Array): the full attention matrix to differentiate in.
        ro: the sampled rollouts (batch >= 2).
        n: the chain length.
        model: the model.
        V (jax.Array | None): the full value matrix (``full_values``); None: the fixed V.

    Returns:
        The scalar surrogate.
    """
    advantage = jax.lax.stop_gradient(leave_one_out_advantage(ro.rewards))
    return jnp.mean(advantage * _batch_log_probs(A, ro, n, model, V))


def _mean_and_stderr(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sample mean over the leading axis and its standard error std/sqrt(B)."""
    return jnp.mean(x, axis=0), jnp.std(x, axis=0, ddof=1) / jnp.sqrt(x.shape[0])


def _vocabulary_size(task: ChainTask, model: ModelSpec) -> int:
    """N = 2n + n_isolated: the vocabulary the closed form describes."""
    return 2 * task.n + model.n_isolated


def estimate_reward(theta: Theta, task: ChainTask, model: ModelSpec, key, batch: int, max_len: int | None = None):
    """Monte-Carlo J(theta) = mean reward of ``batch`` rollouts, with its standard error.

    Args:
        theta: the attention scores.
        task: the chain task.
        model: the model.
        key (jax.Array): the jax.random key.
        batch: the number of rollouts, >= 2.
        max_len: the cap (``resolve_max_len``).

    Returns:
        estimate (tuple[jax.Array, jax.Array]): (mean reward, its standard error).

    Raises:
        ValueError: batch < 2 or a bad cap.
    """
    batch = check_int("batch", batch, 2)
    n_vocab = _vocabulary_size(task, model)
    ro = rollouts(full_attention(theta, n_vocab), task, model, key, batch, max_len, _values_of(theta, n_vocab, model))
    return _mean_and_stderr(ro.rewards)


@eqx.filter_jit
def _per_sample_gradients(theta: Theta, ro: Rollouts, n: int, n_vocab: int, model: ModelSpec) -> jnp.ndarray:
    """(R_i - b_i) d log p(path_i) / d theta, shape (batch, P) (forward mode: P = ``Theta.size(model.values)``)."""

    def log_probs(x):
        params = Theta.from_array(x)
        return _batch_log_probs(full_attention(params, n_vocab), ro, n, model, _values_of(params, n_vocab, model))

    scores = jax.jacfwd(log_probs)(theta.as_array(model.values))
    return leave_one_out_advantage(ro.rewards)[:, None] * scores


def estimate_gradient(theta: Theta, task: ChainTask, model: ModelSpec, key, batch: int, max_len: int | None = None):
    """REINFORCE grad J in ``Theta.fields(model.values)`` with per-coordinate standard errors.

    grad = mean_i (R_i - b_i) grad_theta log p(path_i), leave-one-out baseline (exactly unbiased);
    the standard error treats the per-sample terms as independent (their coupling through b_i is
    O(1/B)).

    Args:
        theta: the attention scores.
        task: the chain task.
        model: the model.
        key (jax.Array): the jax.random key.
        batch: the number of rollouts, >= 2.
        max_len: the cap (``resolve_max_len``).

    Returns:
        estimate (tuple[jax.Array, jax.Array]): (grad, its standard errors), each of shape (P,).

    Raises:
        ValueError: batch < 2 or a bad cap.
    """
    batch = check_int("batch", batch, 2)
    n_vocab = _vocabulary_size(task, model)
    ro = rollouts(full_attention(theta, n_vocab), task, model, key, batch, max_len, _values_of(theta, n_vocab, model))
    return _mean_and_stderr(_per_sample_gradients(theta, ro, task.n, n_vocab, model))


__getattr__ = module_getattr(__name__)  # deprecated names (gradflow._deprecated)
