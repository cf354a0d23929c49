"""The one-layer attention policy over vertices, in the five symmetric numbers of docs/THEORY.md §2.

For a query vertex u the trained attention row A[u, .] takes five values by the relation of the
context token to u: alpha (edge u->w), beta (edge w->u), gamma (edge not touching u), eta (the vertex
token u), delta (another vertex token).  The value matrix is fixed: an edge (x, y) writes 1 on x and
y, a vertex token writes 0.  The next-vertex logits are (1/tau) * sum_j weight_j * V[c_j, v].

With ``ModelSpec(values="trained")`` V is trained too, in five symmetric numbers (docs/THEORY.md §10):
an edge (x, y) writes sigma on x, rho on y, omega elsewhere; a vertex token v writes mu on v, nu
elsewhere (the fixed V is sigma = rho = 1, omega = mu = nu = 0).  Its closed form is
``gradflow.two_matrix``; the row functions below describe the fixed-V model only.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import as_float_array, check_choice, check_int, check_positive
from gradflow._deprecated import deprecated_int_task, renamed_property
from gradflow.policy import chain_targets, context_counts, count_logit, distinct_rows, distinct_rows_traced, edge_counts
from gradflow.task import ChainTask, PaddedTask

ATTENTION_KINDS = ("linear", "softmax")
CONTEXTS = ("prompt", "history")
NUMBER_KINDS = ("float64", "extended")
VALUE_KINDS = ("fixed", "trained")
ATTENTION_FIELDS = ("alpha", "beta", "gamma", "eta", "delta")
VALUE_FIELDS = ("sigma", "rho", "omega", "mu", "nu")
FIXED_VALUES = (1.0, 1.0, 0.0, 0.0, 0.0)  # sigma, rho, omega, mu, nu of the fixed V


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
    numbers: the numbers of the uncapped closed form's solves (and of the noise moments' whole recursion):
    "float64" (default; NaN where a row-scaled elimination leaves float64's range, logit gaps of a few
    hundred) or "extended" (float64 digits with an unbounded exponent, ``gradflow._extended``: finite at any
    logit gap, several times slower; its own compiled program).  The eager public functions and the flows
    take "extended" by themselves where "float64" gave a NaN; under a user's jit/vmap/grad pick it here.
    """

    attention: str = eqx.field(static=True, default="linear")
    tau: jnp.ndarray = eqx.field(converter=as_float_array, default=0.2)
    mask_self: bool = eqx.field(static=True, default=True)
    n_isolated: int = eqx.field(static=True, default=0)
    context: str = eqx.field(static=True, default="prompt")
    max_len: int | None = eqx.field(static=True, default=None)
    values: str = eqx.field(static=True, default="fixed")
    numbers: str = eqx.field(static=True, default="float64")

    def __check_init__(self):
        check_choice("numbers", self.numbers, NUMBER_KINDS)
        if self.numbers == "extended" and not _extended_reaches(self):
            raise ValueError(
                f"numbers='extended' covers the uncapped closed forms only (max_len=None), got max_len={self.max_len!r}"
            )
        check_choice("values", self.values, VALUE_KINDS)
        if self.max_len is not None:
            check_int("max_len", self.max_len, 1)
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_positive("tau", self.tau)
        check_int("n_isolated", self.n_isolated, 0)
        check_choice("context", self.context, CONTEXTS)
        if not isinstance(self.mask_self, bool):
            raise ValueError(f"mask_self must be True or False, got {self.mask_self!r}")


class LaidOutModel(eqx.Module):
    """A ``ModelSpec`` whose self-mask, number of isolated vertices and cap are traced numbers, not structure, so that
    one compiled program serves every ``mask_self``, ``n_isolated`` and ``max_len`` up to ``cap_size``
    (``gradflow.flow.bucketed`` lays the bucketable flows out with it, as it lays their chains out in a
    ``gradflow.task.PaddedTask``).  Internal: built from a validated ModelSpec by ``of``; the closed forms read the
    mask and count through ``self_loops`` and ``RowLogits`` and the cap through ``gradflow.capped``, where a traced
    number selects and a Python one (a ModelSpec) still picks the code statically.  ``cap_size``: the number of steps
    the capped recursions run, those past the cap keeping their values (None: uncapped)."""

    attention: str = eqx.field(static=True)
    tau: jnp.ndarray
    mask_self: jnp.ndarray  # bool
    n_isolated: jnp.ndarray  # float64: the count
    context: str = eqx.field(static=True)
    max_len: jnp.ndarray | None  # int64: the cap; None: uncapped
    values: str = eqx.field(static=True)
    numbers: str = eqx.field(static=True)
    cap_size: int | None = eqx.field(static=True, default=None)

    @classmethod
    def of(cls, model: ModelSpec, cap_size: int | None = None) -> LaidOutModel:
        """``model`` with its mask, isolated count and cap as data (numpy on the host: a batch stacks them); a capped
        model's recursions run ``cap_size`` >= max_len steps (default: max_len itself)."""
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelSpec)}
        data = {"mask_self": np.asarray(model.mask_self), "n_isolated": np.asarray(float(model.n_isolated))}
        if model.max_len is not None:
            cap_size = model.max_len if cap_size is None else cap_size
            if cap_size < model.max_len:
                raise ValueError(f"cap_size must be at least max_len = {model.max_len}, got {cap_size}")
            data |= {"max_len": np.asarray(model.max_len), "cap_size": cap_size}
        return cls(**{**fields, **data})


def is_data(x) -> bool:
    """Whether a structural number (a flag, a count) is data (an array, traced or not: ``LaidOutModel``), not a
    Python number that picks the code statically."""
    return not isinstance(x, (bool, int, np.integer))


def self_loops(model: ModelSpec | LaidOutModel):
    """Whether the walk may write its current vertex (``not mask_self``): a Python bool for a ModelSpec, traced for a
    ``LaidOutModel``."""
    return jnp.logical_not(model.mask_self) if is_data(model.mask_self) else not model.mask_self


def logit_when(flag, logit) -> list:
    """A logit that is present where ``flag`` holds, as a list of candidates for a row's scale: [logit] where a Python
    flag holds, [] where it does not (no code), [logit where flag, -inf elsewhere] where the flag is traced (weight
    exp(-inf) = 0, derivative 0)."""
    if is_data(flag):
        return [jnp.where(flag, logit, -jnp.inf)]
    return [logit] if flag else []


def _extended_reaches(model: ModelSpec) -> bool:
    """Whether ``numbers="extended"`` reaches the model's closed form (uncapped, V fixed or trained)."""
    return model.max_len is None


def with_extended_numbers(model: ModelSpec) -> ModelSpec | None:
    """The model with numbers="extended" (``ModelSpec.numbers``), or None where it has them already or they do
    not reach its closed form (a cap)."""
    if model.numbers == "extended" or not _extended_reaches(model):
        return None
    return dataclasses.replace(model, numbers="extended")


class Theta(eqx.Module):
    """The attention numbers (alpha, beta, gamma, eta, delta) and the value numbers (sigma, rho, omega,
    mu, nu; keyword-only, default the fixed V: 1, 1, 0, 0, 0); a pytree for grad/jit/vmap.

    The parameter vector is the fields the model trains in order (``fields(values)``, ``size(values)``):
    A's five numbers with ``values="fixed"`` (the default, so the flow's state is unchanged), all ten with
    ``values="trained"``.  Code that handles theta as an array takes its length from here.
    """

    alpha: jnp.ndarray = eqx.field(converter=as_float_array)
    beta: jnp.ndarray = eqx.field(converter=as_float_array)
    gamma: jnp.ndarray = eqx.field(converter=as_float_array)
    eta: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0)
    delta: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0)
    sigma: jnp.ndarray = eqx.field(converter=as_float_array, default=1.0, kw_only=True)
    rho: jnp.ndarray = eqx.field(converter=as_float_array, default=1.0, kw_only=True)
    omega: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0, kw_only=True)
    mu: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0, kw_only=True)
    nu: jnp.ndarray = eqx.field(converter=as_float_array, default=0.0, kw_only=True)

    @classmethod
    def fields(cls, values: str = "fixed") -> tuple[str, ...]:
        """The names of the trained numbers, in array order: A's five ("fixed"), then V's five ("trained")."""
        check_choice("values", values, VALUE_KINDS)
        return ATTENTION_FIELDS if values == "fixed" else ATTENTION_FIELDS + VALUE_FIELDS

    @classmethod
    def size(cls, values: str = "fixed") -> int:
        """The length of the parameter vector (5 with the fixed V, 10 with V trained)."""
        return len(cls.fields(values))

    def as_array(self, values: str = "fixed") -> jnp.ndarray:
        """The trained numbers stacked on the last axis, in the order of ``fields(values)``."""
        return jnp.stack(jnp.broadcast_arrays(*(getattr(self, name) for name in self.fields(values))), axis=-1)

    @classmethod
    def from_array(cls, x, values: str | None = None) -> Theta:
        """Inverse of ``as_array``: the last axis of ``x`` holds 5 numbers (A; V fixed, broadcast to the
        batch shape) or 10 (A then V); ``values`` (None: read off the length) must match when given."""
        x = jnp.asarray(x, dtype=float)
        sizes = {cls.size(kind): kind for kind in VALUE_KINDS}
        kind = sizes.get(x.shape[-1]) if x.ndim else None
        if kind is None or (values is not None and values != kind):
            wanted = " or ".join(str(k) for k in sizes) if values is None else str(cls.size(values))
            raise ValueError(f"theta array must have last axis of size {wanted}, got shape {x.shape}")
        numbers = [x[..., k] for k in range(x.shape[-1])]
        if kind == "fixed":
            numbers += [jnp.full(x.shape[:-1], value) for value in FIXED_VALUES]
        return cls(*numbers[:5], **dict(zip(VALUE_FIELDS, numbers[5:])))


def default_theta0() -> Theta:
    """The default start of every flow and training run: Theta(0.3, 0, 0) (alpha > 0, the rest 0)."""
    return Theta(0.3, 0.0, 0.0)


def authors_start(scale: float = 1e-8) -> Theta:
    """The symmetric stand-in for the authors' start of the two-matrix model: every A number and sigma, rho,
    mu equal to ``scale``, omega = nu = 0.

    A choice (docs/THEORY.md §10): the authors draw every entry of A and V at random with size ``scale``;
    the symmetric start keeps the size of the entries and sets the "elsewhere" entries of V to 0, so the
    effective value differences sigma - omega, rho - omega and mu - nu start at ``scale``.

    Args:
        scale: the size of the entries.

    Returns:
        The ``Theta`` (for ``ModelSpec(values="trained")``).
    """
    return Theta(scale, scale, scale, scale, scale, sigma=scale, rho=scale, omega=0.0, mu=scale, nu=0.0)


def vocabulary_size(n, model: ModelSpec, n_vocab: int | None = None) -> int:
    """N, the number of vertex tokens: ``n_vocab`` when given, else 2n + n_isolated.

    Args:
        n (int | ChainTask): the chain length, or a ChainTask (its ``n`` is used).
        model: the model (its n_isolated).
        n_vocab: an explicit vocabulary size.

    Returns:
        N.
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


def orbit_sizes(n_vocab: int, values: str = "fixed") -> jnp.ndarray:
    """Entries per query row of the full A that share each of the five numbers (docs/THEORY.md §4.2):
    (N-1, N-1, (N-1)(N-2), 1, N-1) for (alpha, beta, gamma, eta, delta).  ``values="trained"``: the same
    five again for (sigma, rho, omega, mu, nu), V's entries per vertex (V has as many entries per orbit as A)."""
    big_n = check_int("n_vocab", n_vocab, 2)
    sizes = [big_n - 1, big_n - 1, (big_n - 1) * (big_n - 2), 1, big_n - 1]
    return jnp.array(sizes * (Theta.size(values) // len(sizes)), dtype=float)


def value_labels(n_vocab: int) -> np.ndarray:
    """Kind k of every entry V[c, w] (0..4 = sigma, rho, omega, mu, nu), shape (N^2, N): rows the tokens
    in ``orbit_labels``' column order (N vertex tokens, then the edge tokens), columns the vertices."""
    check_int("n_vocab", n_vocab, 2)
    w = np.arange(n_vocab)[None, :]
    vertex = np.where(np.arange(n_vocab)[:, None] == w, 3, 4)
    x, y = np.nonzero(~np.eye(n_vocab, dtype=bool))  # row-major
    edge = np.where(x[:, None] == w, 0, np.where(y[:, None] == w, 1, 2))
    return np.concatenate([vertex, edge], axis=0)


def as_task(task_or_n, name: str = "task") -> ChainTask:
    """The task itself, or from a chain length n (deprecated: warns once) the uniform task of that n.

    Args:
        task_or_n (ChainTask | int): a task, or n where only n matters.
        name: the argument's name in the error message.

    Returns:
        A ChainTask.

    Raises:
        ValueError: neither a ChainTask nor an integer n >= 2.
    """
    if isinstance(task_or_n, ChainTask):
        return task_or_n
    if isinstance(task_or_n, (int, np.integer)) and not isinstance(task_or_n, bool):
        deprecated_int_task()
        return ChainTask.uniform(check_int("n", task_or_n, 2))
    raise ValueError(f"{name} must be a gradflow.ChainTask or a chain length n >= 2, got {task_or_n!r}")


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


def require_fixed_values(model: ModelSpec) -> None:
    """Raise for ``values="trained"``: the fixed-V rows below would silently drop V (``gradflow.two_matrix``
    has the closed form of the expected reward and the per-start success of the trained-V model)."""
    if model.values != "fixed":
        raise NotImplementedError(
            "this quantity is implemented for ModelSpec(values='fixed') only; with values='trained' use "
            "the expected reward / success (gradflow.two_matrix) or token-level sampling"
        )


def query_scores(theta: Theta, u, n: int, model: ModelSpec, start_vertex=-1):
    """s(u) = the effective (alpha, beta, gamma)/tau of query vertex u (canonical index, any shape).

    linear: theta/tau for every row.  softmax: exp(score)/Z(u)/tau over the prompt's context tokens,
    Z(u) = e^alpha #out(u) + e^beta #in(u) + e^gamma #far(u) + e^{eta if u is the start else delta}
    (``gradflow.policy.context_counts``), by log-sum-exp (no overflow at any theta).

    Args:
        theta: the attention scores.
        u (int | jax.Array | None): query vertices, canonical indices, any shape (unused for linear attention).
        n: the chain length.
        model: the model (attention, tau).
        start_vertex (int | jax.Array): the canonical start vertex, whose own token scores eta (-1: none).

    Returns:
        scores (tuple[jax.Array, jax.Array, jax.Array]): the effective alpha, beta, gamma per query (shape of
            ``u``; scalars for linear attention).
    """
    require_fixed_values(model)
    if model.attention == "linear":
        return theta.alpha / model.tau, theta.beta / model.tau, theta.gamma / model.tau
    n_out, n_in, n_far = context_counts(u, n)
    vertex = jnp.where(u == start_vertex, theta.eta, theta.delta)
    shares = attention_shares([(theta.alpha, n_out), (theta.beta, n_in), (theta.gamma, n_far), (vertex, 1.0)])
    return tuple(share / model.tau for share in shares[:3])


def row_scores(theta: Theta, n: int, model: ModelSpec, start: int | None = None) -> RowScores:
    """``query_scores`` of the chain rows (2, n-1) and of an isolated row; softmax: ``start`` (position on
    chain a, 1..n-1) gets eta.  Linear attention: scalars (every row sees theta/tau).

    Args:
        theta: the attention scores.
        n: the chain length.
        model: the model.
        start: the start's position on chain a, 1..n-1 (softmax only); None: no row gets eta.

    Returns:
        The effective scores of the chain rows and of an isolated query vertex.
    """
    if model.attention == "linear":
        a, b, g = query_scores(theta, None, n, model)
        return RowScores(a, b, g, g)
    chain_rows = np.arange(2)[:, None] * n + np.arange(n - 1)[None, :]
    start_vertex = -1 if start is None else start - 1
    a, b, g = query_scores(theta, chain_rows, n, model, start_vertex)
    return RowScores(a, b, g, query_scores(theta, 2 * n, n, model)[2])


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
    """The weights of ``row_logits`` (exp of the logits; self 0 when masked, pred 0 at i = 1).

    Each field broadcasts to (2, n-1) (linear attention: (n-1,) or a scalar, the chains are alike).

    Args:
        scores: the row scores (``row_scores``).
        n: the chain length.
        model: the model (mask_self).

    Returns:
        The local and far-baseline weights of every chain row.
    """
    rows = row_logits(scores, n, model)
    present = lambda flag, x: jnp.where(flag, jnp.exp(jnp.where(flag, x, 0.0)), 0.0)
    return LocalRows(
        succ=jnp.exp(rows.succ),
        self_=jnp.exp(rows.self_) * (0.0 if model.mask_self else 1.0),
        pred=present(rows.has_pred, rows.pred),
        base_succ=jnp.exp(rows.base_succ),
        base_self=jnp.exp(rows.base_self),
        base_pred=present(rows.has_pred, rows.base_pred),
        far1=jnp.exp(scores.gamma),
        far2=jnp.exp(2.0 * scores.gamma),
    )


def chain_a_rows(rows: LocalRows, n: int) -> LocalRows:
    """The rows of chain a (positions 1..n-1): every field of ``rows`` as an (n-1,) array.

    Args:
        rows: the row weights of both chains (``local_rows``).
        n: the chain length.

    Returns:
        The same weights restricted to chain a.
    """
    return LocalRows(*(jnp.broadcast_to(x, (2, n - 1))[0] for x in rows))


def row_normaliser(rows: LocalRows, n: int, model: ModelSpec) -> jnp.ndarray:
    """Z(u) = sum over all vertices of the row weights: 4 degree-1 + (2n-4) degree-2 + isolated + local.

    Args:
        rows: the row weights (``local_rows``).
        n: the chain length.
        model: the model (n_isolated).

    Returns:
        Z(u) for every chain row (the shape of the fields of ``rows``).
    """
    local = (rows.succ - rows.base_succ) + (rows.self_ - rows.base_self) + (rows.pred - rows.base_pred)
    return 4.0 * rows.far1 + (2 * n - 4) * rows.far2 + model.n_isolated + local


class RowLogits(NamedTuple):
    """Log-weights (logits) of the chain rows a_i, i = 1..n-1, for the accurate solves.

    Each array field broadcasts to the rows (linear attention: (n-1,); softmax: (2, n-1), chain a /
    chain b).  ``succ``, ``self_``, ``pred``: logits of a_{i+1}, a_i, a_{i-1} (finite dummies where
    absent: see ``has_pred`` and ``self_present``); ``base_*``: the far-vertex logit g * deg(v) those
    vertices would get; ``g``: the row's far logit per edge end (degree-2 vertices get 2g);
    ``g_iso``: the same for an isolated query vertex.  ``deg1_*``: the vertex has degree 1 (a chain
    end).  ``far1``, ``far2``: the row's non-local degree-1 and degree-2 chain vertices (both chains).
    ``n``, ``self_present`` and ``n_isolated`` are Python numbers (static), or traced (a ``PaddedTask``'s n, a
    ``LaidOutModel``'s mask and count).
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
    far1: np.ndarray
    far2: np.ndarray
    self_present: bool | jnp.ndarray
    n: int | jnp.ndarray
    n_isolated: int | jnp.ndarray
    last: np.ndarray = None


def row_logits(scores: RowScores, n: int, model: ModelSpec, positions=None) -> RowLogits:
    """docs/THEORY.md §2.2 in logits, read off ``gradflow.policy.chain_targets``: logit = c(u, v) . s(u).

    Args:
        scores: the row scores (``row_scores``).
        n: the chain length.
        model: the model (mask_self, n_isolated).
        positions (np.ndarray | None): the chain rows a_i wanted (linear attention only, where every row sees
            the same scores, e.g. ``gradflow.policy.distinct_rows``); None: all, i = 1..n-1.

    Returns:
        The logits of the local targets, their far baselines and the far counts of the chain rows.
    """
    positions = np.arange(1, n) if positions is None else positions
    targets = chain_targets(n, positions)
    a, b, g = scores.alpha, scores.beta, scores.gamma
    row_logit = lambda counts: count_logit(counts, a, b, g)
    return RowLogits(
        succ=row_logit(targets.succ),
        self_=row_logit(targets.self_),
        pred=row_logit(targets.pred),
        base_succ=targets.deg_succ * g,
        base_self=targets.deg_self * g,
        base_pred=targets.deg_pred * g,
        g=g + jnp.zeros(len(positions)),
        g_iso=scores.isolated,
        has_pred=targets.has_pred,
        deg1_succ=targets.deg_succ == 1,
        deg1_self=targets.deg_self == 1,
        deg1_pred=targets.deg_pred == 1,
        far1=targets.far1,
        far2=targets.far2,
        self_present=self_loops(model),
        n=n,
        n_isolated=model.n_isolated,
        last=positions == n - 1,
    )


def chain_a_logits(rows: RowLogits) -> RowLogits:
    """The rows of chain a: every per-row field of ``rows`` as a 1-D array (softmax rows are (2, n-1))."""
    per_row = RowLogits._fields[:8]
    width = len(rows.last)
    return rows._replace(**{f: jnp.broadcast_to(getattr(rows, f), (2, width))[0] for f in per_row})


def _stacked_terms(terms) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(logits, counts) of (logit, count) pairs, broadcast together and stacked on a last axis."""
    pairs = [jnp.broadcast_arrays(jnp.asarray(logit, float), jnp.asarray(count, float)) for logit, count in terms]
    logits = jnp.broadcast_arrays(*(logit for logit, _ in pairs))
    counts = jnp.broadcast_arrays(*(count for _, count in pairs))
    return jnp.stack(logits, -1), jnp.stack(counts, -1)


def _log_sum_stacked(logits, counts) -> jnp.ndarray:
    """log(sum_j count_j * exp(logit_j)) over the last axis (``log_sum``)."""
    present = counts > 0
    top = jax.lax.stop_gradient(jnp.max(jnp.where(present, logits, -jnp.inf), axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    scaled = jnp.where(present, counts * jnp.exp(jnp.where(present, logits, top) - top), 0.0)
    return jnp.log(jnp.sum(scaled, axis=-1)) + top[..., 0]


def own_and_other(h, q, e=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(P(own terminal), P(other terminal)) from the absorbing solutions h (own), q (other) and e = h - 1/2 (the
    deviation, solved for itself), each read from the one that keeps its digits: 1/2 +- e while |e| <= 1/4 (so
    h - 1/2 and its gradient keep their leading digits near 1/2), else from the smaller of h and q (own = h or
    1 - q, other = 1 - h or q: the one near 1 keeps the digits of its distance to 1).  Without e: h and q only."""
    if e is None:
        e = jnp.full(jnp.shape(h), jnp.inf)
    mid, smaller = jnp.abs(e) <= 0.25, h <= q
    own = jnp.where(mid, 0.5 + e, jnp.where(smaller, h, 1.0 - q))
    return own, jnp.where(mid, 0.5 - e, jnp.where(smaller, 1.0 - h, q))


def log_sum(terms) -> jnp.ndarray:
    """log(sum_j count_j * exp(logit_j)) for (logit, count) pairs, counts >= 0 (arrays or numbers).

    A term with count 0 contributes nothing (and no gradient); the maximum is taken over present terms.
    """
    return _log_sum_stacked(*_stacked_terms(terms))


@jax.custom_jvp
def _shares(logits, counts) -> jnp.ndarray:
    """exp(logit_k) / sum_j count_j exp(logit_j) over the last axis, 0 where count_k = 0 (``attention_shares``)."""
    log_z = _log_sum_stacked(logits, counts)[..., None]
    # a token the row does not hold has share 0 (not exp(logit - log_z), unbounded at |logit| >~ 709)
    return jnp.exp(jnp.where(counts > 0, logits - log_z, -jnp.inf))


@_shares.defjvp
def _shares_jvp(primals, tangents):
    """d share_k = share_k sum_j p_j (d logit_k - d logit_j), p_j = count_j share_j (sum 1): the j = k term is exactly
    0, so a dominant token's share keeps the digits of its derivative (share_k (1 - p_k), 1 - p_k of 1e-20), which
    d logit_k - d log Z loses (1 - 1 in float64)."""
    logits, counts = primals
    d_logits = tangents[0]
    shares = _shares(logits, counts)
    weights = counts * shares
    spread = jnp.sum(weights[..., None, :] * (d_logits[..., :, None] - d_logits[..., None, :]), -1)
    return shares, shares * spread


def attention_shares(terms) -> tuple:
    """exp(logit_k) / sum_j count_j exp(logit_j) for (logit, count) pairs: the softmax weight of ONE token of each
    kind (0 for a kind with count 0), its derivatives to relative accuracy (``_shares_jvp``)."""
    shares = _shares(*_stacked_terms(terms))
    return tuple(shares[..., k] for k in range(len(terms)))


def row_log_total(rows: RowLogits, include_self: bool) -> dict:
    """log of the row's weight groups: "local" pieces and the far groups, for probabilities by exp(l - log Z).

    Args:
        rows: the row logits (``row_logits``).
        include_self: count the row's own vertex in the total (False when the current vertex is masked; traced for a
            ``LaidOutModel``, ``self_loops``).

    Returns:
        A dict of logs, each shaped like ``rows.g``: total (Z), switch (all of chain b), jump (chain a minus
        the three local vertices), isolated (n_isolated weight-1 vertices; -inf when there are none).
    """
    n, m = rows.n, rows.n_isolated
    g = rows.g
    one = jnp.ones_like(g)
    d1 = lambda flag: jnp.where(flag, 1.0, 0.0)
    # chain a far weights except the local vertices present in the row: all far vertices but chain b's
    n1, n2 = rows.far1 - 2.0, rows.far2 - (n - 2.0)
    jump = log_sum([(g, n1), (2.0 * g, n2)])
    switch = log_sum([(g, 2.0 * one), (2.0 * g, (n - 2.0) * one)])
    total_terms = [(rows.succ, one), (rows.pred, d1(rows.has_pred)), (g, n1 + 2.0), (2.0 * g, n2 + (n - 2.0))]
    if is_data(include_self):  # traced (``LaidOutModel``): a count of 0 or 1 (0 adds nothing, exactly)
        total_terms.append((rows.self_, d1(include_self)))
    elif include_self:
        total_terms.append((rows.self_, one))
    if is_data(m):  # traced
        total_terms.append((jnp.zeros_like(g), m * one))
        isolated = jnp.where(m > 0, jnp.log(jnp.where(m > 0, m, 1.0)), -jnp.inf)
    else:
        total_terms += [(jnp.zeros_like(g), m * one)] if m else []
        isolated = jnp.log(m) if m else -jnp.inf
    return {
        "total": log_sum(total_terms),
        "switch": switch,
        "jump": jnp.where(n1 + n2 > 0, jump, -jnp.inf),
        "isolated": jnp.full_like(g, isolated),
    }


class StepProbabilities(NamedTuple):
    """Next-vertex probabilities from a_i, i = 1..n-1 (each shape (n-1,), they sum to 1).

    forward: to a_{i+1}; backward: to a_{i-1}; stay: the self-loop a_i -> a_i (0 under mask_self);
    switch: to any b vertex; jump: to a non-adjacent vertex of chain a; isolated: to an isolated vertex.
    ``self`` is the deprecated name of ``stay``.
    """

    forward: jnp.ndarray
    backward: jnp.ndarray
    stay: jnp.ndarray
    switch: jnp.ndarray
    jump: jnp.ndarray
    isolated: jnp.ndarray
    move: jnp.ndarray = None

    self = renamed_property("StepProbabilities.self")

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
    if isinstance(task, PaddedTask):  # n traced, laid out in a bucket: the slots past n - 1 never move
        positions, kind, valid = distinct_rows_traced(task.n, task.size - 1)
        distinct = _step_probabilities(theta, task.n, model, positions)
        pads = {name: 1.0 if name == "move" else 0.0 for name in StepProbabilities._fields}
        return StepProbabilities(**{name: jnp.where(valid, x[kind], pads[name]) for name, x in distinct._asdict().items()})
    n = as_task(task).n
    positions, kind = distinct_rows(n) if model.attention == "linear" else (None, slice(None))
    distinct = _step_probabilities(theta, n, model, positions)
    return StepProbabilities(*(x[kind] for x in distinct))  # linear attention: each kind of row computed once


def _step_probabilities(theta: Theta, n, model: ModelSpec, positions) -> StepProbabilities:
    """``step_probabilities`` of the chain-a rows at ``positions`` (None: all rows)."""
    rows = chain_a_logits(row_logits(row_scores(theta, n, model), n, model, positions))
    loops = self_loops(model)
    logs = row_log_total(rows, include_self=loops)
    log_z = logs["total"]
    prob = lambda log_w: jnp.exp(log_w - log_z)
    stay = jnp.where(loops, prob(jnp.where(loops, rows.self_, log_z)), 0.0)
    local_move = jnp.stack(
        [rows.succ, jnp.where(rows.has_pred, rows.pred, -jnp.inf), logs["switch"], logs["jump"], logs["isolated"]], -1
    )
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
    """Vertex order of every dense matrix: a_1..a_n, b_1..b_n, then i_1..i_m.

    Args:
        n: the chain length.
        n_isolated: the number m of isolated vertices.

    Returns:
        The 2n + m names, in canonical order.
    """
    return [f"a{i}" for i in range(1, n + 1)] + [f"b{i}" for i in range(1, n + 1)] + [f"i{k}" for k in range(1, n_isolated + 1)]


def edge_list(n: int) -> list[tuple[int, int]]:
    """The 2(n-1) directed edges (x, y) as vertex indices in ``vertex_names`` order."""
    return [(c * n + i, c * n + i + 1) for c in range(2) for i in range(n - 1)]


def next_vertex_logits(theta: Theta, u, n: int, model: ModelSpec, start_vertex=-1) -> jnp.ndarray:
    """Logits c(u, v) . s(u) of every vertex v (canonical order) for query vertices ``u`` (any shape).

    Args:
        theta: the attention scores.
        u (int | jax.Array): query vertices, canonical indices (``vertex_names`` order), any shape.
        n: the chain length.
        model: the model.
        start_vertex (int | jax.Array): the canonical start (softmax only: that row attends to its own
            token with eta; -1: none).

    Returns:
        The logits, shape u.shape + (2n + n_isolated,), the current vertex at -inf when ``model.mask_self``.
    """
    u = jnp.asarray(u)[..., None]
    v = jnp.arange(2 * n + model.n_isolated)
    a, b, g = (jnp.asarray(x)[..., None] for x in query_scores(theta, u[..., 0], n, model, start_vertex))
    logits = count_logit(edge_counts(u, v, n), a, b, g)
    if model.mask_self:
        logits = jnp.where(u == v, -jnp.inf, logits)
    return logits


@eqx.filter_jit
def transition_matrix(theta: Theta, task, model: ModelSpec, start: int | None = None) -> jnp.ndarray:
    """Dense next-vertex probabilities P[u, v] = softmax_v of ``next_vertex_logits`` (docs/THEORY.md §2.2).

    Rows of terminals are computed like any other (the walk stops there).  ``gradflow.sampling``
    builds the same matrix token by token.

    Args:
        theta: the attention scores.
        task (ChainTask | int): a ChainTask or the chain length n.
        model: the model.
        start: the start's position on chain a (softmax only: that row attends to its own token with eta).

    Returns:
        P, shape (2n + n_isolated, 2n + n_isolated), rows and columns in ``vertex_names`` order.
    """
    n = as_task(task).n
    start_vertex = -1 if start is None else start - 1
    return jax.nn.softmax(next_vertex_logits(theta, jnp.arange(2 * n + model.n_isolated), n, model, start_vertex), axis=1)
