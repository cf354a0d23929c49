"""The two-matrix model (docs/THEORY.md §10): V trained as well as A; expected reward and per-start
success in closed form, O(n) per start.

With S = sigma - omega, R = rho - omega, M = mu - nu and the row's effective scores (a, b, g, e, d) =
(alpha, beta, gamma, eta, delta)/tau (softmax: exp(score)/Z(u)/tau over the context: the prompt's
edges, the start token and the current vertex's token, counted once), query u = a_i gives

    successor a_{i+1}:   a R + g S [a_{i+1} not a terminal]
    itself a_i:          a S + b R [i >= 2] + M e            (drops out of every absorption probability)
    predecessor a_{i-1}: b S + g R [a_{i-1} not a chain start]
    any other vertex w:  g (R [w not a chain start] + S [w not a terminal])   (0 for an isolated vertex)
    plus M d on the start s when s != u.

So the transient vertices fall into two far classes (chain starts, interior vertices; terminals absorb)
and the start vertex gets its own column: for each start, (I - Q) on the 2(n-1) chain rows is a
tridiagonal T (the local corrections, each row in its own scale) minus a rank-3 part U C^T, C = (chain
starts, interior vertices, the start: disjoint, U >= 0), solved by Woodbury: one ``gth_solve`` of T with 2 + 4
columns and a 3 x 3 capacitance rebuilt from the absorption rates (positive sums, no 1 - K).  Isolated vertices are
eliminated exactly (each returns to chain vertex w with
the isolated row's probability of w, a combination of the same three columns).  Self-loops drop out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import _extended as ext
from gradflow._extended import EXTENDED, FLOAT, Numbers
from gradflow._linalg import EXTENDED_OPS, TINY_PIVOT, capacitance_solve, diff_exp, gth_solve, solve_extended
from gradflow.model import ModelSpec, StepProbabilities, Theta, attention_shares, log_sum, own_and_other
from gradflow.task import ChainTask


def value_differences(theta: Theta) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(sigma - omega, rho - omega, mu - nu): the only combinations of V the policy depends on."""
    return theta.sigma - theta.omega, theta.rho - theta.omega, theta.mu - theta.nu


def balances(theta: Theta, sizes=None) -> jnp.ndarray:
    """(edge, vertex) = sum_k w_k (a_k^2 - v_k^2) over the edge numbers (alpha, beta, gamma against sigma, rho,
    omega) and the vertex numbers (eta, delta against mu, nu): |A|^2 - |V|^2 per kind of token on the
    symmetric subspace, conserved by the linear-attention gradient flow (docs/THEORY.md §10).

    Args:
        theta: the parameters (any batch shape).
        sizes (jax.Array | None): the weights w of A's five numbers, V's the same: the orbit sizes for the
            flow in full coordinates (``FlowParams.orbit_sizes()[:5]``); None (all 1) for reduced coordinates.

    Returns:
        An array of shape (..., 2).
    """
    weights = jnp.ones(5) if sizes is None else jnp.asarray(sizes, dtype=float)[:5]
    a = jnp.stack(jnp.broadcast_arrays(theta.alpha, theta.beta, theta.gamma, theta.eta, theta.delta), axis=-1)
    v = jnp.stack(jnp.broadcast_arrays(theta.sigma, theta.rho, theta.omega, theta.mu, theta.nu), axis=-1)
    terms = weights * (a - v) * (a + v)
    return jnp.stack([jnp.sum(terms[..., :3], -1), jnp.sum(terms[..., 3:], -1)], -1)


def _require_two_matrix(model: ModelSpec) -> None:
    if model.values != "trained":
        raise ValueError(f"gradflow.two_matrix needs ModelSpec(values='trained'), got values={model.values!r}")
    if model.context != "prompt" or model.max_len is not None:
        raise NotImplementedError("the two-matrix closed form here is uncapped, context='prompt' (a cap: gradflow.capped)")


def _rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(chain 0/1, position 1..n-1) of the 2(n-1) transient rows a_1..a_{n-1}, b_1..b_{n-1} (static)."""
    return np.repeat([0, 1], n - 1), np.tile(np.arange(1, n), 2)


def row_scores(theta: Theta, n: int, model: ModelSpec, start, rows=None):
    """Effective (a, b, g, e, d) of the transient rows (each (2(n-1),)) and of an isolated row (scalars).

    linear: theta/tau.  softmax: exp(score - log Z(u))/tau with Z(u) = e^alpha #out + e^beta #in + e^gamma #far
    + e^eta (u's own token) + e^delta [u != s] (the start's token); 0 for a token the row does not hold (b without a
    predecessor, d on the start's own row).

    Args:
        theta: the parameters.
        n: the chain length.
        model: the model (attention, tau).
        start (int | jax.Array): the start's position on chain a, 1..n-1.
        rows (tuple | None): (chain 0/1, position) of the rows wanted (None: all 2(n-1) transient rows).

    Returns:
        (rows, isolated): two 5-tuples of effective scores.
    """
    names = ("alpha", "beta", "gamma", "eta", "delta")
    scores = [getattr(theta, name) for name in names]
    chain, pos = _rows(n) if rows is None else rows
    if model.attention == "linear":
        scaled = tuple(x / model.tau + jnp.zeros(jnp.shape(pos)) for x in scores)
        return scaled, tuple(x / model.tau for x in scores)
    alpha, beta, gamma, eta, delta = scores
    not_start = jnp.where((chain == 0) & (pos == start), 0.0, 1.0)
    has_pred = (pos >= 2) * 1.0
    # a token the row does not hold (beta without a predecessor, delta on the start's own row) has score 0
    counts = (1.0, has_pred, 2.0 * (n - 1) - 1.0 - has_pred, 1.0, not_start)
    row = attention_shares(list(zip(scores, counts)))
    isolated = attention_shares(list(zip(scores, (0.0, 0.0, 2.0 * (n - 1), 1.0, 1.0))))
    return tuple(x / model.tau for x in row), tuple(x / model.tau for x in isolated)


class StartLogits(NamedTuple):
    """The logits of the model seen from one start (docs/THEORY.md §10), before each row's scale.

    Chain rows (each (2(n-1),), chain a then chain b, positions 1..n-1): succ, self_, pred (-inf without a
    predecessor), the far classes' logits chain_start (g S), interior (g (R + S)), terminal (g R); the
    start, where it is a far target of the row (start_far, a mask: not the row itself or a neighbour), has
    its class's logit start_class plus start_extra = M d.  The isolated row (scalars): iso_start,
    iso_interior, iso_terminal, iso_start_class, iso_start_extra (the same with g_iso, d_iso) and iso_self
    (M e_iso); an isolated vertex has logit 0 from every row.
    """

    succ: jnp.ndarray
    self_: jnp.ndarray
    pred: jnp.ndarray
    chain_start: jnp.ndarray
    interior: jnp.ndarray
    terminal: jnp.ndarray
    start_class: jnp.ndarray
    start_extra: jnp.ndarray
    start_far: jnp.ndarray
    iso_start: jnp.ndarray
    iso_interior: jnp.ndarray
    iso_terminal: jnp.ndarray
    iso_start_class: jnp.ndarray
    iso_start_extra: jnp.ndarray
    iso_self: jnp.ndarray


def start_logits(theta: Theta, n: int, model: ModelSpec, start, rows=None) -> StartLogits:
    """The ``StartLogits`` of every chain row (or of ``rows``) and of an isolated row, seen from the start a_start.

    Args:
        theta: the parameters (A and V).
        n: the chain length.
        model: the model (attention, tau).
        start (int | jax.Array): the start's position on chain a, 1..n-1.
        rows (tuple | None): (chain 0/1, position) of the rows wanted (None: all 2(n-1) transient rows).

    Returns:
        The ``StartLogits``.
    """
    S, R, M = value_differences(theta)
    chain, pos = _rows(n) if rows is None else rows
    (a, b, g, e, d), (_, _, g_iso, e_iso, d_iso) = row_scores(theta, n, model, start, rows)
    on_a = chain == 0
    is_s, s_is_succ, s_is_pred = on_a & (pos == start), on_a & (pos + 1 == start), on_a & (pos - 1 == start)
    start_class = lambda classes: jnp.where(start == 1, classes[0], classes[1])  # a chain start or interior
    succ = a * R + jnp.where(pos == n - 1, 0.0, g * S) + jnp.where(s_is_succ, M * d, 0.0)
    pred = jnp.where(pos >= 2, b * S + jnp.where(pos - 1 >= 2, g * R, 0.0) + jnp.where(s_is_pred, M * d, 0.0), -jnp.inf)
    self_ = a * S + jnp.where(pos >= 2, b * R, 0.0) + M * e
    classes = (g * S, g * (R + S), g * R)
    start_far = ~is_s & ~s_is_succ & ~s_is_pred
    iso_classes = (g_iso * S, g_iso * (R + S), g_iso * R)
    the_start = (start_class(classes), M * d, start_far)
    return StartLogits(succ, self_, pred, *classes, *the_start, *iso_classes, start_class(iso_classes), M * d_iso, M * e_iso)


def query_logits(logits: StartLogits, n: int, model: ModelSpec, start, u) -> jnp.ndarray:
    """Next-vertex logits of the transient vertex u (canonical index: a chain vertex before its terminal, or an
    isolated vertex) read off the start's ``StartLogits``, up to a constant per row: O(n).

    Chain row u = (chain c, position i): the far classes by position (chain start, interior, terminal), the
    start with its extra where it is far, 0 on the isolated vertices, then u's successor, itself and its
    predecessor; the isolated row: the same classes with its own numbers, itself ``iso_self``, the other
    isolated vertices 0.  The current vertex is at -inf when ``model.mask_self``.

    Args:
        logits: the start's logits (``start_logits``).
        n: the chain length.
        model: the model (n_isolated, mask_self).
        start (int | jax.Array): the start's position on chain a, 1..n-1 (the one ``logits`` were built for).
        u (int | jax.Array): the query vertex (a scalar).

    Returns:
        The logits, shape (2n + n_isolated,), in ``gradflow.model.vertex_names`` order.
    """
    v = jnp.arange(2 * n + model.n_isolated)
    v_chain, v_pos, v_isolated = v // n, v % n + 1, v >= 2 * n
    u_chain, u_pos = u // n, u % n + 1
    r = jnp.clip(u_chain * (n - 1) + u_pos - 1, 0, 2 * (n - 1) - 1)  # u's chain row (any row for an isolated u)
    by_class = lambda first, interior, terminal: jnp.where(v_pos == 1, first, jnp.where(v_pos == n, terminal, interior))
    chain = by_class(logits.chain_start[r], logits.interior[r], logits.terminal[r])
    chain = jnp.where(logits.start_far[r] & (v == start - 1), chain + logits.start_extra[r], chain)
    same = (v_chain == u_chain) & ~v_isolated
    chain = jnp.where(same & (v_pos == u_pos + 1), logits.succ[r], chain)
    chain = jnp.where(same & (v_pos == u_pos - 1), logits.pred[r], chain)
    chain = jnp.where(v == u, logits.self_[r], jnp.where(v_isolated, 0.0, chain))
    isolated = by_class(logits.iso_start, logits.iso_interior, logits.iso_terminal)
    isolated = jnp.where(v == start - 1, isolated + logits.iso_start_extra, isolated)
    isolated = jnp.where(v == u, logits.iso_self, jnp.where(v_isolated, 0.0, isolated))
    row = jnp.where(u >= 2 * n, isolated, chain)
    return jnp.where(v == u, -jnp.inf, row) if model.mask_self else row


def step_probabilities(theta: Theta, task: ChainTask, model: ModelSpec) -> StepProbabilities:
    """Per-position step probabilities of the row of a_i seen from the start a_i (the walk's first step from
    each start; a choice: with V trained a row depends on the start through the start's extra M d), i = 1..n-1:
    O(1) per row from the row's class logits (docs/THEORY.md §10).

    Args:
        theta: the parameters (A and V).
        task: the chain task.
        model: the model (``values="trained"``).

    Returns:
        The ``gradflow.model.StepProbabilities`` (each (n-1,)).
    """
    if model.values != "trained":
        raise ValueError(f"gradflow.two_matrix needs ModelSpec(values='trained'), got values={model.values!r}")
    n, m = task.n, model.n_isolated

    def at(i):
        logits = start_logits(theta, n, model, i, (jnp.zeros(1, int), i[None]))
        one = lambda x: jnp.asarray(x).reshape(-1)[0]
        succ, self_, pred = one(logits.succ), one(logits.self_), one(logits.pred)
        first, interior, terminal = one(logits.chain_start), one(logits.interior), one(logits.terminal)
        # chain a, not a_{i-1}, a_i, a_{i+1}: a_1 when i >= 3, the other interior vertices, a_n when i <= n-2
        n_near = (i - 1 >= 2) * 1.0 + (i >= 2) + (i + 1 <= n - 1)
        jump = log_sum([(first, (i >= 3) * 1.0), (interior, n - 2.0 - n_near), (terminal, (i <= n - 2) * 1.0)])
        switch = log_sum([(first, 1.0), (interior, n - 2.0), (terminal, 1.0)])
        isolated = jnp.log(float(m)) if m else -jnp.inf
        has_pred = (i >= 2) * 1.0
        pred = jnp.where(i >= 2, pred, 0.0)
        far = [(first, (i >= 3) + 1.0), (interior, 2.0 * (n - 2) - n_near), (terminal, (i <= n - 2) + 1.0), (0.0, float(m))]
        move = log_sum([(succ, 1.0), (pred, has_pred)] + far)
        total = move if model.mask_self else jnp.logaddexp(move, self_)
        prob = lambda log_w: jnp.exp(log_w - total)
        stay = jnp.zeros(()) if model.mask_self else prob(self_)
        backward = jnp.where(i >= 2, prob(pred), 0.0)
        return StepProbabilities(prob(succ), backward, stay, prob(switch), prob(jump), prob(isolated), prob(move))

    return jax.vmap(at)(jnp.arange(1, n))


def _start_outcome(theta: Theta, n: int, model: ModelSpec, start, split: bool = False) -> tuple:
    """(P(own terminal), P(other terminal), their deviation e = h - 1/2) from a_start: one tridiagonal-plus-rank-3
    solve (``split``: e by its mirror-symmetric part, ``start_deviation``)."""
    x, _ = _start_solve(theta, n, model, start, split=split)
    return x[0], x[1], x[2]


class StartSystem(NamedTuple):
    """The absorbing chain of the 2(n-1) chain rows (chain a then chain b) seen from one start, each row in its
    own scale (divided by exp(``top``)), self-loops dropped and isolated vertices eliminated exactly.

    excess, lower, upper (2(n-1),): the tridiagonal T (``gradflow._linalg.gth_solve``); u (2(n-1), 3): each
    row's weight on every chain start, every interior vertex (the start excluded from both) and on the start
    (isolated detours folded in), 0 on a column all of whose vertices are the row's neighbours or itself
    (their whole weight then stays in T); c (2(n-1), 3): the rows of each of those columns (disjoint);
    rates (2(n-1), 2): into a_n and into b_n; deviation (2(n-1),): (rate into a_n - rate into b_n) / 2, the right-hand
    side of e = h - 1/2, from the last rows' successor minus terminal-class weight (to relative accuracy; 0 in every
    other row); total: the row's weight on every target (its self-loop included
    when allowed); iso_tokens: the row's weight on the isolated vertices times the isolated row's total over
    its weight on the chain (0 without isolated vertices: a right-hand side r_iso at the isolated vertices
    enters row u as iso_tokens r_iso); log_forward: log P(successor) of each row; top: each row's scale.
    Every entry of u, rates, total and excess is a sum of positive terms (T is diagonally dominant).
    """

    excess: jnp.ndarray
    lower: jnp.ndarray
    upper: jnp.ndarray
    u: jnp.ndarray
    c: jnp.ndarray
    rates: jnp.ndarray
    deviation: jnp.ndarray
    total: jnp.ndarray
    iso_tokens: jnp.ndarray
    log_forward: jnp.ndarray
    top: jnp.ndarray


def start_system(theta: Theta, n: int, model: ModelSpec, start, numbers: Numbers = FLOAT) -> StartSystem:
    """The ``StartSystem`` of the chain rows seen from a_start: (I - Q) on the 2(n-1) rows is T - U C^T.

    Args:
        theta: the parameters (A and V).
        n: the chain length.
        model: the model (attention, tau, mask_self, n_isolated).
        start (int | jax.Array): the start's position on chain a, 1..n-1.
        numbers: float64 (``FLOAT``) or ``EXTENDED`` weights (no underflow at any logit gap; ``top``, ``c`` and
            ``log_forward`` stay floats).

    Returns:
        The ``StartSystem``.
    """
    add, scale, where = numbers.add, numbers.scale, numbers.where
    chain, pos = _rows(n)
    has_pred = pos >= 2
    m = model.n_isolated
    succ_terminal = pos == n - 1
    on_a = chain == 0
    is_s = on_a & (pos == start)
    s_first = start == 1  # the start is a chain start (class 0), else interior (class 1)
    logits = start_logits(theta, n, model, start)
    succ, pred = logits.succ, logits.pred
    cls_start, cls_int, cls_term = logits.chain_start, logits.interior, logits.terminal
    s_far, s_near = logits.start_far, ~logits.start_far & ~is_s  # the start far from the row, its neighbour
    s_logit = logits.start_class + logits.start_extra
    cands = [succ, pred, cls_start, cls_term, jnp.where(s_far, s_logit, -jnp.inf)]
    cands += [cls_int] if n >= 3 else []
    cands += [jnp.zeros_like(succ)] if m else []
    # the row's scale is its heaviest logit, derivative included (any scale gives the same solution): the heaviest weight
    # is then a constant for differentiation and a light one's derivative keeps its digits (a stop-gradient scale gave
    # every weight its logit's derivative, which cancelled between the heavy ones: grad h 1e-258 for 1.8e-123 at 1e4).
    # The heaviest picked by index, not by max's derivative (an equality test: under jit, no candidate may equal it)
    stacked = jnp.stack(cands)
    top = jnp.take_along_axis(stacked, jax.lax.stop_gradient(jnp.argmax(stacked, axis=0))[None], 0)[0]
    shape = jnp.shape(top)
    none = numbers.zeros(shape)
    ex = lambda logit: numbers.exp(logit - top + jnp.zeros(shape))
    present = lambda flag, logit: where(flag, ex(jnp.where(flag, logit, top)), none)
    minus = lambda x, y: add(x, scale(y, -1.0))
    w_succ, w_pred = ex(succ), present(has_pred, pred)
    w_start, w_int, w_term = ex(cls_start), ex(cls_int), ex(cls_term)
    w_s = present(s_far, s_logit)  # the start's actual weight where it is far

    # far targets per column (the start in its own column): chain starts, interior vertices, terminals
    n_start = 2.0 - (pos == 1) - (pos == 2) - (s_first & s_far)
    n_int = 2.0 * (n - 2) - (pos >= 2) - (pos + 1 <= n - 1) - (pos - 1 >= 2) - (~s_first & s_far)
    n_term = 2.0 - succ_terminal
    rest = add(add(scale(w_start, n_start), scale(w_int, n_int)), add(scale(w_term, n_term), w_s))  # non-local targets
    if m:
        rest = add(rest, scale(ex(0.0), float(m)))
    u_start, u_int = where(n_start > 0, w_start, none), where(n_int > 0, w_int, none)

    # isolated detours: an isolated vertex returns to chain vertex w with probability pi(w)
    if m:
        iso_start, iso_int, iso_term, iso_s = logits.iso_start, logits.iso_interior, logits.iso_terminal, logits.iso_start_class
        log_y, log_stay = _isolated_logs(logits, n, model, start)
        pi = lambda logit: scale(ex(logit - log_y), float(m))  # m e^{-top} pi(w), pi(w) = e^{logit} / Y <= 1
        iso = (pi(iso_start), pi(iso_int), pi(iso_s + logits.iso_start_extra), pi(iso_term))
        # tokens among the isolated vertices per visit: 1 / P(land on the chain) = 1 + (stay weight) / Y
        stay = ex(0.0) if log_stay is None else add(ex(0.0), ex(log_stay - log_y))  # no overflow of stay / Y
        iso_tokens = scale(stay, float(m))
    else:
        iso, iso_tokens = (none, none, none, none), none

    # each local vertex's column weight (what U C^T puts there; 0 for the start: it is local, so u's start column is 0)
    column_weight = lambda first, here_s: where(here_s, none, where(first, u_start, u_int))
    k_succ = column_weight(False, s_near & (pos + 1 == start) & on_a)
    k_pred = column_weight(pos == 2, s_near & (pos - 1 == start) & on_a)
    own = column_weight(pos == 1, is_s)
    upper = where(succ_terminal, none, minus(w_succ, k_succ))
    lower = where(has_pred, minus(w_pred, k_pred), none)
    # excess = D_u + own column weight - |upper| - |lower|, without subtracting a local weight from itself:
    # W - |W - K| is K when W >= K, else 2W - K (an absorbing successor keeps its whole weight); every K > 0 has a far
    # vertex of its column in ``rest`` (and ``own``), so the excess is >= 0
    kept = lambda w, k: where(_nonnegative(minus(w, k)), k, minus(scale(w, 2.0), k))
    succ_kept = where(succ_terminal, w_succ, kept(w_succ, k_succ))
    pred_kept = where(has_pred, kept(w_pred, k_pred), none)
    excess = add(add(rest, own), add(succ_kept, pred_kept))
    u = numbers.stack([add(u_start, iso[0]), add(u_int, iso[1]), add(w_s, iso[2])], -1)
    to_a, to_b = where(on_a & succ_terminal, w_succ, w_term), where(~on_a & succ_terminal, w_succ, w_term)
    rates = numbers.stack([add(to_a, iso[3]), add(to_b, iso[3])], -1)
    half_c = scale(diff_exp(succ, cls_term, top, numbers), 0.5)  # the last rows: (succ - terminal class) / 2
    deviation = where(succ_terminal, scale(half_c, jnp.where(on_a, 1.0, -1.0)), none)
    total = add(add(w_succ, w_pred), rest)  # the row's weight on every target, in its scale
    if not model.mask_self:
        total = add(total, ex(logits.self_))
    log_forward = succ - top - _log(total)
    c = jnp.stack([(pos == 1) & ~is_s, (pos >= 2) & ~is_s, is_s], -1).astype(float)
    return StartSystem(excess, lower, upper, u, c, rates, deviation, total, iso_tokens, log_forward, top)


class StartDeviation(NamedTuple):
    """e = h - 1/2 seen from one start, by its mirror-symmetric part (docs/THEORY.md §10): e = e_sym + G r.

    e_sym is the deviation of the chain whose chain-a rows are the model's and whose chain-b rows are their mirror
    images: antisymmetric (-e_sym on chain b, 0 at the isolated vertices), it solves chain a's rows folded onto one
    chain (``_folded_rows``).  r is its residual in the model's rows (0 on chain a) and G >= 0 the system's solve.
    e_sym (n-1,): chain a; chain (2(n-1),): r on the chain rows in the system's scale, the isolated vertices' eliminated
    (each row's detours times their residual); iso (): an isolated vertex's e over its mean on its return to the chain
    (e(iso) = sum_w P(return to w) e(w) + iso).  In the system's numbers."""

    e_sym: Any
    chain: Any
    iso: Any


def _folded_rows(logits: StartLogits, n: int, m: int, start, rows, top, numbers: Numbers, own_chain: bool) -> tuple:
    """(excess, lower, upper, coupling, dev, rate) of the chain rows ``rows`` folded onto their own chain by e(mirror
    image) = -e, the start a_s (logit class + M d) on the rows' own chain (``own_chain``) or on the other.

    Row i: diag e_i - lower e_{i-1} - upper e_{i+1} - coupling e_s = dev, with diag = (its weight off itself) + (its
    mirror image's weight) = excess + |lower| + |upper|; upper, lower: the neighbour's weight minus its mirror image's;
    coupling: +-kappa, kappa = e^{class} (e^{M d} - 1) the fold of the pair (a_s, b_s) where a_s is far from the row;
    dev = (w_succ - w_terminal) / 2 in the last row; rate = diag - upper - lower - coupling (the rows' sums).  Excess
    and rate are sums of positive terms: a neighbour and its mirror image keep 2 min(w, w'), the folded pair (a_s, b_s)
    in the rate 2 e^{class} (own chain) or 2 e^{class + M d}."""
    where, scale, add = numbers.where, numbers.scale, numbers.add
    pos = jnp.asarray(np.tile(np.arange(1, n), 2))[rows]
    at = lambda x: jnp.broadcast_to(x, (2 * (n - 1),))[rows]
    succ, pred, top, extra = at(logits.succ), at(logits.pred), at(top), at(logits.start_extra)
    first, interior, terminal, s_class = at(logits.chain_start), at(logits.interior), at(logits.terminal), at(logits.start_class)
    none = numbers.zeros(pos.shape)
    ex = lambda logit: numbers.exp(logit - top)
    present = lambda flag, logit: where(flag, ex(jnp.where(flag, logit, top)), none)
    counted = lambda count, logit: scale(present(count > 0, logit), count)
    on_start = 0.0 if own_chain else extra  # the extra on a_s as a mirror image
    image = lambda j: jnp.where(j == 1, first, jnp.where(j == n, terminal, interior)) + jnp.where(j == start, on_start, 0.0)
    has_succ, has_pred = pos <= n - 2, pos >= 2  # a transient successor; a predecessor
    s_first, kappa_row = jnp.asarray(start) == 1, jnp.abs(pos - start) >= 2
    # far targets: the own chain off i-1, i, i+1, the other off the neighbours' images, a_s apart (where far), isolated
    apart = kappa_row if own_chain else ~(((start == pos + 1) & has_succ) | ((start == pos - 1) & has_pred))
    n_first = (pos >= 3) * 1.0 + (pos != 2) - (apart & s_first)
    n_interior = 2.0 * (n - 2) - (pos >= 2) - 2.0 * has_succ - 2.0 * (pos - 1 >= 2) - (apart & ~s_first)
    n_terminal = has_succ + 1.0

    def far(starts, more):
        """Far weight, a_s counted ``starts`` times and its class ``more`` more times."""
        total = add(counted(n_first + more * s_first, first), counted(n_interior + more * ~s_first, interior))
        total = add(add(total, counted(n_terminal, terminal)), counted(starts, s_class + extra))
        return add(total, scale(ex(jnp.zeros_like(top)), float(m))) if m else total

    own = ex(image(pos))
    up_image, down_image = image(pos + 1), image(pos - 1)
    kept_succ = where(has_succ, scale(ex(jnp.minimum(succ, up_image)), 2.0), ex(succ))
    kept_pred = where(has_pred, scale(ex(jnp.minimum(jnp.where(has_pred, pred, top), down_image)), 2.0), none)
    excess = add(add(far(apart * 1.0, 0.0), own), add(kept_succ, kept_pred))
    upper = where(has_succ, diff_exp(succ, up_image, top, numbers), none)
    lower = where(has_pred, diff_exp(jnp.where(has_pred, pred, down_image), down_image, top, numbers), none)
    kappa = where(kappa_row, diff_exp(s_class + extra, s_class, top, numbers, gap=extra), none)
    coupling = kappa if own_chain else numbers.scale(kappa, -1.0)
    dev = where(pos == n - 1, scale(diff_exp(succ, terminal, top, numbers), 0.5), none)
    # the rate's pair (a_s, b_s) where folded: e^{class + M d} + e^{class} - coupling, as 2 e^{class} or 2 e^{class + M d}
    pair = kappa_row * 1.0
    rate = far(apart - pair, pair) if own_chain else far(apart + pair, -pair)
    rate = add(add(rate, own), add(scale(present(has_succ, up_image), 2.0), scale(present(has_pred, down_image), 2.0)))
    return excess, lower, upper, coupling, dev, add(rate, present(~has_succ, succ))


def start_deviation(theta: Theta, n: int, model: ModelSpec, start, system: StartSystem, numbers: Numbers = FLOAT):
    """The ``StartDeviation`` of the chain seen from a_start (``system``: its ``start_system``).

    e_sym: chain a's folded rows, (T - c 1_s^T) e = dev, by Sherman-Morrison: e = T^-1 dev + (T^-1 c) e_s with
    e_s = (T^-1 dev)_s / (T^-1 rate)_s ((T - c 1_s^T) 1 = rate, a positive sum).  r: on b_i, i != s,
    2 (k - 1) beta e_s - (k - 1) (alpha - beta) u_i, k = e^{M d}, alpha, beta the weights of b_s, a_s without the
    extra (equal unless b_s is b_i's neighbour), u = e_sym - e_s; on b_s its folded row's residual,
    rate e_s - upper u_{s+1} - lower u_{s-1} - dev (the mirror image of the start row is not b_s's row: the start's own
    token); at an isolated vertex (k - 1) P(a_s) e_s.  u next to a_s is a difference of two near-equal values where
    a_s and a neighbour hold the walk between them: it is also solved with a_s held at 0, T u = dev - e_s rate off
    a_s, and taken from the smaller pair of parts.  Every part of r but b_s's and its neighbours' has the sign of
    (k - 1) e_s, so G r keeps its digits where the two chains' parts of a solve with terminals (1/2, -1/2) cancel
    (their logits tie), and e_sym holds the start row as it is (its derivatives too)."""
    add, mul, scale, apply = numbers.add, numbers.mul, numbers.scale, numbers.apply
    logits = start_logits(theta, n, model, start)
    m, pos, b = model.n_isolated, np.arange(1, n), slice(n - 1, None)
    excess, lower, upper, coupling, dev, rate = _folded_rows(logits, n, m, start, np.arange(n - 1), system.top, numbers, True)
    z = _fold_solve(excess, lower, upper, numbers.stack([dev, coupling, rate], -1), numbers)
    e_s = numbers.div(apply(lambda v: v[start - 1, 0], z), apply(lambda v: v[start - 1, 2], z))
    e_start = _broadcast(numbers, e_s, (n - 1,))
    e_sym = add(apply(lambda v: v[:, 0], z), mul(apply(lambda v: v[:, 1], z), e_start))
    # u = e_sym - e_s, a_s held at 0: T u = dev - e_s rate off a_s (the differences next to a_s keep their digits)
    where, none, here = numbers.where, numbers.zeros((n - 1,)), pos == start
    dropped = add(*(ext.signed_magnitude(numbers, where(pos == start + j, x, none)) for j, x in ((-1, upper), (1, lower))))
    held = (where(here, numbers.exp(jnp.zeros(n - 1)), add(excess, dropped)), where(here | (pos == start + 1), none, lower))
    held += (where(here | (pos == start - 1), none, upper),)
    z_held = _fold_solve(*held, numbers.stack([where(here, none, dev), where(here, none, rate)], -1), numbers)
    parts = (apply(lambda v: v[:, 0], z_held), mul(apply(lambda v: v[:, 1], z_held), e_start))
    # each difference from the pair of parts that is smaller (both exact): e_sym(a_i) and e_s, or the held solve's
    held_smaller = _log_size(*parts) < _log_size(e_sym, e_start)
    u = where(held_smaller, add(parts[0], scale(parts[1], -1.0)), add(e_sym, scale(e_start, -1.0)))

    extra, s_class, top = logits.start_extra[b], logits.start_class[b], system.top[b]
    base = jnp.where(pos == start - 1, logits.succ[b], jnp.where(pos == start + 1, logits.pred[b], s_class))
    alpha = diff_exp(base + extra, base, top, numbers, gap=extra)  # (k - 1) alpha: b_s in row b_i
    beta = diff_exp(s_class + extra, s_class, top, numbers, gap=extra)  # (k - 1) beta: a_s in row b_i
    r = add(scale(mul(beta, e_start), 2.0), scale(mul(add(alpha, scale(beta, -1.0)), u), -1.0))
    _, lower_s, upper_s, _, dev_s, rate_s = _folded_rows(logits, n, m, start, n - 2 + start, system.top, numbers, False)
    padded = numbers.concatenate([numbers.zeros((1,)), u, numbers.zeros((1,))], 0)
    at = lambda i: apply(lambda v: v[i], padded)
    coupled = add(add(mul(upper_s, at(start + 1)), mul(lower_s, at(start - 1))), dev_s)
    r = numbers.where(pos == start, _broadcast(numbers, add(mul(rate_s, e_s), scale(coupled, -1.0)), (n - 1,)), r)
    chain = numbers.concatenate([numbers.zeros((n - 1,)), r], 0)
    if not m:
        return StartDeviation(e_sym, chain, numbers.zeros(()))
    # an isolated vertex returns to the chain with P(a_s) (k - 1) e^{class} / Y more than its mirror-symmetric row
    y_class = logits.iso_start_class - _isolated_logs(logits, n, model, start)[0]
    extra = logits.iso_start_extra
    detours = scale(diff_exp(y_class + extra, y_class, system.top, numbers, gap=extra), float(m))  # m e^-top (k-1) P
    chain = add(chain, mul(detours, _broadcast(numbers, e_s, (2 * (n - 1),))))
    return StartDeviation(e_sym, chain, mul(diff_exp(y_class + extra, y_class, 0.0, numbers, gap=extra), e_s))


def _broadcast(numbers: Numbers, x, shape) -> object:
    """x broadcast to ``shape`` (a float or an ``Extended``)."""
    return numbers.apply(lambda v: jnp.broadcast_to(v, shape), x)


def _log_size(x, y) -> jnp.ndarray:
    """log2 max(|x|, |y|) for floats or ``Extended`` numbers (-inf at 0), held constant for differentiation."""
    size = lambda v: jnp.log2(jnp.abs(v.m)) + v.e if isinstance(v, ext.Extended) else jnp.log2(jnp.abs(v))
    return jax.lax.stop_gradient(jnp.maximum(size(x), size(y)))


def _fold_solve(excess, lower, upper, rhs, numbers: Numbers):
    """``gth_solve`` of the folded rows (float64: NaN where it could not hold the elimination), or in ``EXTENDED``
    numbers."""
    if numbers is EXTENDED:
        return solve_extended(excess, lower, upper, rhs)
    x, min_pivot = gth_solve(excess, lower, upper, rhs)
    return jnp.where(min_pivot >= TINY_PIVOT, x, jnp.nan)


def _isolated_logs(logits: StartLogits, n: int, model: ModelSpec, start) -> tuple:
    """(log Y, log of the stay weight or None) of an isolated row: Y its weight on the chain (the start with its extra),
    the stay weight on the other isolated vertices and on itself (when allowed)."""
    s_first = start == 1
    log_y = log_sum(
        [
            (logits.iso_start, 2.0 - s_first),
            (logits.iso_interior, 2.0 * (n - 2) - (1.0 - s_first)),
            (logits.iso_terminal, 2.0),
            (logits.iso_start_class + logits.iso_start_extra, 1.0),
        ]
    )
    m = model.n_isolated
    stay = ([(0.0, m - 1.0)] if m > 1 else []) + ([] if model.mask_self else [(logits.iso_self, 1.0)])
    return log_y, (log_sum(stay) if stay else None)


def _nonnegative(x) -> jnp.ndarray:
    """x >= 0 for a float or an ``Extended``."""
    return (x.m if isinstance(x, ext.Extended) else x) >= 0


def _log(x) -> jnp.ndarray:
    """log x for a float or an ``Extended`` (x > 0)."""
    return jnp.log(x.m) + x.e * np.log(2.0) if isinstance(x, ext.Extended) else jnp.log(x)


def start_system_solve(system: StartSystem, rhs, signed: bool = False) -> jnp.ndarray:
    """x = (T - U C^T)^{-1} rhs by Woodbury: z_r + z_u y, y = (I - C^T z_u)^{-1} C^T z_r, one ``gth_solve`` of T
    with k + 4 columns and a 3 x 3 capacitance built from positive sums (``_linalg.capacitance_solve``);
    NaN where float64 could not hold the elimination.  An ``EXTENDED`` system (``start_system``) is solved in its
    numbers at any logit gap (``gradflow._extended``).

    Args:
        system: the chain rows (``start_system``).
        rhs (jax.Array): right-hand sides (2(n-1), k), in the rows' scale (the system's numbers).
        signed: right-hand sides of either sign, eliminated as their two positive parts (x = x+ - x-).

    Returns:
        x, shape (2(n-1), k), floats.
    """
    if isinstance(system.excess, ext.Extended):
        return ext.to_float(start_system_solve_extended(system, rhs) if signed else _solve_extended_system(system, rhs))
    k = rhs.shape[-1]
    if signed:
        x = start_system_solve(system, jnp.concatenate([jnp.maximum(rhs, 0.0), jnp.maximum(-rhs, 0.0)], -1))
        return x[:, :k] - x[:, k:]
    absorb = jnp.sum(system.rates, -1)
    z, min_pivot = gth_solve(system.excess, system.lower, system.upper, jnp.concatenate([rhs, system.u, absorb[:, None]], -1))
    z_r, z_u, z_a = z[:, :k], z[:, k : k + 3], z[:, k + 3]
    counts, alpha = jnp.sum(system.c, 0), system.c.T @ z_a
    y = jnp.stack(capacitance_solve(system.c.T @ z_u, alpha, counts, system.c.T @ z_r))
    x = z_r + z_u @ y
    # a column's absorption alpha below the range bounds its capacitance pivot: a compiled program then gave 6e223 for
    # an F of 982 (V trained, |theta|/tau = 300); NaN instead, and the extended numbers take over
    held = (min_pivot >= TINY_PIVOT) & jnp.all((counts == 0) | (alpha >= TINY_PIVOT))
    return jnp.where(held, x, jnp.nan)


def start_system_solve_extended(system: StartSystem, rhs: ext.Extended) -> ext.Extended:
    """``start_system_solve`` of an ``EXTENDED`` system for right-hand sides of either sign (their two positive
    parts solved together, x = x+ - x-), x as an ``Extended`` (a solution that feeds another solve keeps its
    digits: ``gradflow.noise``)."""
    return ext.parts_difference(_solve_extended_system(system, ext.signed_parts(rhs)))


def _solve_extended_system(system: StartSystem, rhs: ext.Extended) -> ext.Extended:
    """``start_system_solve`` for an ``EXTENDED`` system and right-hand sides >= 0: the same Woodbury in
    ``gradflow._extended`` numbers, x as an ``Extended``."""
    k = rhs.m.shape[-1]
    absorb = ext.total(system.rates, -1)
    columns = ext.concatenate([rhs, system.u, ext.apply(lambda v: v[:, None], absorb)], -1)
    z = solve_extended(system.excess, system.lower, system.upper, columns)
    part = lambda lo, hi: ext.apply(lambda v: v[:, lo:hi], z)
    z_r, z_u, z_a = part(0, k), part(k, k + 3), part(k + 3, k + 4)
    by_column = lambda x: [ext.total(ext.where(system.c[:, j, None] > 0, x, ext.zeros(x.m.shape)), 0) for j in range(3)]
    k_rows, alpha, b = by_column(z_u), by_column(z_a), by_column(z_r)
    pick = lambda x, j: ext.apply(lambda v: v[..., j], x)
    k_matrix = [[pick(k_rows[i], j) for j in range(3)] for i in range(3)]
    alpha = [pick(a, 0) for a in alpha]
    y = capacitance_solve(k_matrix, alpha, jnp.sum(system.c, 0), b, EXTENDED_OPS)
    x = z_r
    for j in range(3):
        x = ext.add(x, ext.mul(ext.apply(lambda v, j=j: v[:, j, None], z_u), ext.apply(lambda v: v[None, :], y[j])))
    return x


def _start_solve(theta: Theta, n: int, model: ModelSpec, start, lengths: bool = False, split: bool = False):
    """The solve from a_start: (P(own), P(other), e = h - 1/2[, E[tokens to a terminal]]) at the start, and log P(succ)
    of every chain row (2(n-1),), in the model's numbers (``ModelSpec.numbers``).

    e from its own right-hand side (``StartSystem.deviation``, signed: its two parts solved together) keeps its digits
    near h = 1/2 to the solve's absolute accuracy, all J and its gradient need; where the two chains' logits tie its two
    parts cancel and grad e comes out 0.  ``split``: e = e_sym + G r (``start_deviation``), which keeps e and its
    derivatives to relative accuracy there (the noise moments' m = grad h per start), at about twice the program.

    The length's right-hand side is each row's total weight (self-loop included when allowed: a token),
    plus, per isolated target, the expected tokens spent among the isolated vertices before landing on a
    chain vertex (``iso_tokens``).
    """
    numbers = EXTENDED if model.numbers == "extended" else FLOAT
    system = start_system(theta, n, model, start, numbers)
    deviation = start_deviation(theta, n, model, start, system, numbers) if split else None
    columns = [numbers.apply(lambda v: v[:, 0], system.rates), numbers.apply(lambda v: v[:, 1], system.rates)]
    columns.append(deviation.chain if split else system.deviation)
    if lengths:  # (Z - w_self) L_u - sum_v w_v L_v = Z + m w_iso / P(an isolated vertex lands on the chain)
        iso_tokens = numbers.apply(lambda v: jnp.broadcast_to(v, jnp.shape(system.top)), system.iso_tokens)
        columns.append(numbers.add(system.total, iso_tokens))
    rhs = numbers.stack(columns, -1)
    if not split:
        return start_system_solve(system, rhs, signed=True)[start - 1], system.log_forward
    solved = start_system_solve_extended(system, rhs) if numbers is EXTENDED else start_system_solve(system, rhs, signed=True)
    x = numbers.apply(lambda v: v[start - 1], solved)
    part = lambda lo, hi: numbers.apply(lambda v: v[lo:hi], x)
    e = numbers.add(numbers.apply(lambda v: v[start - 1][None], deviation.e_sym), part(2, 3))
    x = numbers.concatenate([part(0, 2), e, part(3, None)], 0)
    return numbers.to_float(x), system.log_forward


def outcome_per_start(theta: Theta, task: ChainTask, model: ModelSpec, split_deviation: bool = False) -> tuple:
    """(P(own terminal), P(other terminal)) per start distance d = 1..n-1, each read from the solution that keeps its
    digits (``gradflow.model.own_and_other``: e = h - 1/2 near 1/2, else the smaller of h and q).

    Args:
        theta: the parameters (A and V).
        task: the chain task.
        model: the model (``values="trained"``, prompt context, no cap).
        split_deviation: e = h - 1/2 by its mirror-symmetric part (``start_deviation``): its derivatives keep their
            digits where the two chains' logits tie (the noise moments' m), at about twice the program.

    Returns:
        (own, other), each (n-1,), entry d-1 for the start a_{n-d}.
    """
    _require_two_matrix(model)
    n = task.n
    outcome = lambda position: _start_outcome(theta, n, model, position, split_deviation)
    own, other = own_and_other(*jax.vmap(outcome)(jnp.arange(1, n)))
    return own[::-1], other[::-1]


def length_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """L[d-1] = E[tokens from a_{n-d} until the first terminal], self-loops and isolated detours counted, V trained:
    the absorption solve with each row's total weight as right-hand side (one more column)."""
    _require_two_matrix(model)
    n = task.n
    lengths = jax.vmap(lambda position: _start_solve(theta, n, model, position, lengths=True)[0][3])(jnp.arange(1, n))
    return lengths[::-1]


def traversal_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """T[d-1] = prod_{i=n-d}^{n-1} P(a_i -> a_{i+1}) over the rows seen from the start a_{n-d}, V trained."""
    _require_two_matrix(model)
    n = task.n
    chain, pos = _rows(n)

    def at_start(position):
        log_forward = _start_solve(theta, n, model, position)[1]
        return jnp.exp(jnp.sum(jnp.where((chain == 0) & (pos >= position), log_forward, 0.0)))

    return jax.vmap(at_start)(jnp.arange(1, n))[::-1]


@eqx.filter_jit
def same_side_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """h[d-1] = P(the walk from a_{n-d} is absorbed at its own terminal), V trained."""
    return outcome_per_start(theta, task, model)[0]


@eqx.filter_jit
def expected_loss(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """1 - J = sum_d p[d-1] P(the walk from a_{n-d} ends at the other terminal), V trained."""
    return jnp.sum(task.start_probs * outcome_per_start(theta, task, model)[1])


@eqx.filter_jit
def expected_reward(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """J = sum_d p[d-1] h[d-1], V trained (read as 1 - loss above 1/2)."""
    own, other = outcome_per_start(theta, task, model)
    loss = jnp.sum(task.start_probs * other)
    return jnp.where(loss < 0.5, 1.0 - loss, jnp.sum(task.start_probs * own))
