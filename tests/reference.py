"""Independent references for the closed form: dense float64 solves and an mpmath chain at 50+ digits.

``dense_same_side_probability`` / ``dense_length_per_start``: the token-built transition matrix
(``gradflow.transition_matrix``) and one dense float64 solve of (I - Q) g = r (moved here from
gradflow.objective: tests and benchmarks only).  ``dense_capped``: the capped read-outs by numpy
powers of the same matrix with both terminals made absorbing.

``mp_chain(theta, n, model, start)``: the transition matrix rebuilt token by token in mpmath from the
edge list (docs/THEORY.md §2.2; nothing shared with gradflow's solves), and ``mp_absorption`` its absorption
probabilities and expected lengths by GTH state reduction (Grassmann-Taksar-Heyman: every
elimination divides by the eliminated state's summed leaving probability, never 1 - p), so the
reference keeps relative accuracy at any theta; the working precision is raised until
P(own) - 1/2 keeps 30 digits.  ``mp_reward_gradient``: central differences of J - 1/2 in mpmath.

The two-matrix model (V trained, docs/THEORY.md §10): ``dense_matrices`` builds the full A (N x N^2) and
V (N^2 x N) entry by entry from the ten numbers with Python loops (nothing shared with gradflow's orbit
tables), ``dense_logits`` / ``dense_transition`` the next-vertex logits and matrix of the token-built chain
seen from one start (context: the prompt's edge tokens plus the vertex tokens {s, u}, u counted once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np

import gradflow as gf
from gradflow.model import ModelSpec, Theta, transition_matrix
from gradflow.task import ChainTask

# --------------------------------------------------------------------------------------------------
# dense float64 (fast, small n)
# --------------------------------------------------------------------------------------------------


def dense_matrices(x, n_vocab: int):
    """(A, V) from the ten numbers x, entry by entry; tokens: N vertex tokens, then edges (x, y), x != y."""
    tokens = [("v", v) for v in range(n_vocab)] + [("e", (p, q)) for p in range(n_vocab) for q in range(n_vocab) if p != q]
    a_kind, v_kind = np.zeros((n_vocab, len(tokens)), int), np.zeros((len(tokens), n_vocab), int)
    for j, (kind, tok) in enumerate(tokens):
        for u in range(n_vocab):
            if kind == "v":
                a_kind[u, j] = 3 if tok == u else 4
                v_kind[j, u] = 8 if tok == u else 9
            else:
                a_kind[u, j] = 0 if tok[0] == u else 1 if tok[1] == u else 2
                v_kind[j, u] = 5 if tok[0] == u else 6 if tok[1] == u else 7
    return x[a_kind], x[v_kind], {tok: j for j, tok in enumerate(tokens)}


def dense_logits(x, n: int, model: gf.ModelSpec, start: int):
    """The N x N next-vertex logits of the token-built chain for the start a_start (the current vertex at -inf
    when masked; jax, differentiable)."""
    n_vocab = 2 * n + model.n_isolated
    A, V, column = dense_matrices(x, n_vocab)
    edges = [column[("e", (c * n + i, c * n + i + 1))] for c in range(2) for i in range(n - 1)]
    s = start - 1
    rows = []
    for u in range(n_vocab):
        context = edges + sorted({column[("v", s)], column[("v", u)]})
        scores = A[u, jnp.array(context)]
        weights = jax.nn.softmax(scores) if model.attention == "softmax" else scores
        logits = weights @ V[jnp.array(context)] / model.tau
        if model.mask_self:
            logits = logits.at[u].set(-jnp.inf)
        rows.append(logits)
    return jnp.stack(rows)


def dense_transition(x, n: int, model: gf.ModelSpec, start: int):
    """The N x N next-vertex matrix of the token-built chain for the start a_start (jax, differentiable)."""
    return jax.nn.softmax(dense_logits(x, n, model, start), axis=1)


def _dense_per_start(theta: Theta, task: ChainTask, model: ModelSpec, cost: float, terminal) -> jnp.ndarray:
    """Dense solve of (I - Q) g = cost + R t over all non-terminal vertices (O(n^3)), by distance d."""
    n = task.n
    transient = np.array([v for v in range(2 * n + model.n_isolated) if v not in (n - 1, 2 * n - 1)])

    def solve(start):
        p = transition_matrix(theta, n, model, start=start)
        q = p[np.ix_(transient, transient)]
        r = cost + p[transient, n - 1] * terminal[0] + p[transient, 2 * n - 1] * terminal[1]
        return jnp.linalg.solve(jnp.eye(transient.size) - q, r)

    if model.attention == "linear":
        return solve(None)[: n - 1][::-1]
    return jax.vmap(lambda s: solve(s)[s - 1])(jnp.arange(1, n))[::-1]


def dense_same_side_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """``same_side_probability`` by a dense float64 solve on the full transition matrix."""
    return _dense_per_start(theta, task, model, 0.0, (1.0, 0.0))


def dense_length_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """``length_per_start`` by a dense float64 solve on the full transition matrix."""
    return _dense_per_start(theta, task, model, 1.0, (0.0, 0.0))


def dense_matrix(theta: Theta, n: int, model: ModelSpec, position: int) -> np.ndarray:
    """The token-built transition matrix (numpy) of a walk started at a_position (the start token enters softmax only)."""
    return np.asarray(transition_matrix(theta, n, model, start=position if model.attention == "softmax" else None))


def dense_capped(theta: Theta, n: int, model: ModelSpec, cap: int) -> np.ndarray:
    """(success, reach, length, traversal) per start distance d (entry d-1) by dense matrix powers.

    With both terminals absorbing, P(a_n within T tokens) is entry (start, a_n) of the T-th power, and
    E[min(L, T)] = sum_{k<T} P(no terminal after k tokens).
    """
    out = np.zeros((4, n - 1))
    for d in range(1, n):
        position = n - d
        p = dense_matrix(theta, n, model, position)
        absorbing = p.copy()
        for terminal in (n - 1, 2 * n - 1):
            absorbing[terminal] = 0.0
            absorbing[terminal, terminal] = 1.0
        power = np.eye(len(p))
        survival = 0.0
        for _ in range(cap):
            survival += 1.0 - power[position - 1, n - 1] - power[position - 1, 2 * n - 1]
            power = power @ absorbing
        row = power[position - 1]
        path = np.prod([p[i - 1, i] for i in range(position, n)]) if d <= cap else 0.0
        out[:, d - 1] = row[n - 1], row[n - 1] + row[2 * n - 1], survival, path
    return out


# --------------------------------------------------------------------------------------------------
# mpmath reference
# --------------------------------------------------------------------------------------------------


def mp_chain(theta, n: int, model: ModelSpec, start: int | None = None):
    """P[u][v] (mpmath, current precision) on vertices a_1..a_n, b_1..b_n, isolated, from the tokens.

    Prompt = the 2(n-1) edge tokens (+ the start vertex token for softmax).  Query u scores edge
    (x, y) with alpha if x = u, beta if y = u, else gamma; softmax normalises the scores over the
    prompt tokens (the start token scores eta for u = start, delta otherwise).  logit(v) = (1/tau)
    sum of the (normalised) scores of the edges containing v; the self vertex is dropped when masked.
    """
    return _mp_chain_numbers([mp.mpf(float(x)) for x in np.asarray(theta.as_array(), dtype=float)], n, model, start)


def mp_absorption(rows, n: int):
    """(h, q, L) for every vertex by GTH state reduction: P(absorbed at a_n), at b_n, expected tokens
    (``mp_absorbing_solve`` with the three columns: cost 0, 0, 1; terminals (1, 0, 0) at a_n, (0, 1, 0) at b_n).

    Transient states are eliminated one by one: P(i, j) += P(i, k) P(k, j) / S_k with S_k the sum of
    k's probabilities to other states (self-loops fold into S); costs c(i) += P(i, k) c(k) / S_k.  Values
    are recovered backwards: value(k) = (c(k) + sum_j P(k, j) value(j)) / S_k over states left when k
    was eliminated.  Only positive numbers are ever added.
    """
    zero, one = mp.mpf(0), mp.mpf(1)
    g = mp_absorbing_solve(rows, n, [[zero, zero, one]] * len(rows), ([one, zero, zero], [zero, one, zero]))
    return tuple([values[c] for values in g] for c in range(3))


def mp_per_start(theta, task: ChainTask, model: ModelSpec, dps: int = 50):
    """(h, q, L) per start distance d = 1..n-1 (entry d-1) as mpf lists, at ``dps`` digits or more:
    the precision is raised until every h - 1/2 keeps 30 significant digits (or is below 1e-400)."""
    n = task.n
    while True:
        with mp.workdps(dps):
            hs, qs, ls = [], [], []
            shared = mp_absorption(mp_chain(theta, n, model), n) if model.attention == "linear" else None
            for d in range(1, n):
                position = n - d
                h, q, length = shared or mp_absorption(mp_chain(theta, n, model, position), n)
                hs.append(+h[position - 1]), qs.append(+q[position - 1]), ls.append(+length[position - 1])
            smallest = min(abs(h - q) for h in hs for q in [1 - h])
        needed = 40 + max(0, int(-mp.log10(smallest))) if smallest > 0 else dps
        if needed <= dps or dps >= 450:
            return hs, qs, ls, dps
        dps = min(needed + 10, 450)


def mp_reward(theta, task: ChainTask, model: ModelSpec, dps: int = 50):
    """(J, 1 - J, sum p L) in mpmath."""
    hs, qs, ls, _ = mp_per_start(theta, task, model, dps)
    p = [mp.mpf(float(x)) for x in np.asarray(task.start_probs)]
    return mp.fsum(a * b for a, b in zip(p, hs)), mp.fsum(a * b for a, b in zip(p, qs)), mp.fsum(a * b for a, b in zip(p, ls))


def mp_reward_gradient(theta_array, task: ChainTask, model: ModelSpec, components=(0, 1, 2), digits: int = 20):
    """dJ/dtheta_k by 4th-order central differences of J - 1/2 in mpmath (step 1e-12), each at doubling precision
    until two precisions agree to ``digits`` digits of the derivative itself (a derivative far below J's own digits,
    e.g. 1e-94 at |theta|/tau = 1e3, needs far more than J does).  Returns floats."""
    x0 = np.asarray(theta_array, dtype=float)
    _, _, _, dps = mp_per_start(Theta.from_array(x0), task, model)
    return np.array([_agreeing(lambda p, k=k: _central_difference(x0, k, task, model, p), dps + 40, digits) for k in components])


def _central_difference(x0, k: int, task: ChainTask, model: ModelSpec, dps: int):
    """(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h of f = J - 1/2 along theta_k, h = 1e-12, at ``dps`` digits."""
    with mp.workdps(dps):
        step = mp.mpf(10) ** -12

        def deviation(shift):
            x = [mp.mpf(float(v)) for v in x0]
            x[k] += shift
            return _mp_deviation(x, task, model)

        return (8 * (deviation(step) - deviation(-step)) - (deviation(2 * step) - deviation(-2 * step))) / (12 * step)


def _agreeing(value_at, dps: int, digits: int, zero_dps: int = 1000, max_dps: int = 8000) -> float:
    """value_at(dps) at doubling dps until two successive precisions agree to ``digits`` relative digits; an exact 0
    only once it stays 0 up to ``zero_dps`` digits (a derivative of 1e-211 reads 0 at 200 digits, at 300 it does not)."""
    previous = value_at(dps)
    while dps < max_dps:
        dps *= 2
        current = value_at(dps)
        with mp.workdps(dps):
            settled = abs(current - previous) <= mp.mpf(10) ** -digits * abs(current)
        if settled and (current != 0 or dps >= zero_dps):
            return float(current)
        previous = current
    raise RuntimeError(f"the derivative did not settle to {digits} digits by {max_dps} digits of precision")


def _mp_deviation(x, task: ChainTask, model: ModelSpec):
    """J - 1/2 at an mpmath theta (the chain built from mpf numbers directly)."""
    n = task.n
    total = mp.mpf(0)
    shared = mp_absorption(_mp_chain_numbers(x, n, model, None), n) if model.attention == "linear" else None
    for d, p in zip(range(1, n), np.asarray(task.start_probs)):
        if p == 0:
            continue
        position = n - d
        h, _, _ = shared or mp_absorption(_mp_chain_numbers(x, n, model, position), n)
        total += mp.mpf(float(p)) * (h[position - 1] - mp.mpf(1) / 2)
    return total


def _mp_policy_row(logit, u: int, model: ModelSpec) -> dict:
    """Row u of the policy in mpmath: softmax of the logits over every vertex (u itself left out when masked)."""
    allowed = [v for v in range(len(logit)) if not (model.mask_self and v == u)]
    top = max(logit[v] for v in allowed)
    weight = {v: mp.exp(logit[v] - top) for v in allowed}
    z = mp.fsum(weight.values())
    return {v: w / z for v, w in weight.items()}


def _mp_chain_numbers(x, n, model, start, row=_mp_policy_row):
    """``mp_chain`` for theta given as five mpf numbers (no float rounding of a shifted theta); ``row`` turns
    each query's logits into its row (default: the policy's probabilities)."""
    alpha, beta, gamma, eta, delta = x
    tau = mp.mpf(float(model.tau))
    n_vertices = 2 * n + model.n_isolated
    edges = [(c * n + i, c * n + i + 1) for c in range(2) for i in range(n - 1)]
    start_vertex = None if start is None else start - 1
    rows = []
    for u in range(n_vertices):
        scores = [alpha if a == u else beta if b == u else gamma for a, b in edges]
        if model.attention == "softmax":
            vertex = eta if u == start_vertex else delta
            top = max(scores + [vertex])
            z = mp.fsum(mp.exp(s - top) for s in scores) + mp.exp(vertex - top)
            scores = [mp.exp(s - top) / z for s in scores]
        logit = [mp.mpf(0)] * n_vertices
        for (a, b), s in zip(edges, scores):
            logit[a] += s / tau
            logit[b] += s / tau
        rows.append(row(logit, u, model))
    return rows


# --------------------------------------------------------------------------------------------------
# mpmath reference with V trained (the ten numbers, docs/THEORY.md §10)
# --------------------------------------------------------------------------------------------------


def mp_chain_trained(x, n: int, model: ModelSpec, start: int, row=_mp_policy_row):
    """P[u][v] (mpmath) of the token-built chain with V trained, seen from the start a_start, from the ten numbers x
    (mpf or floats): the context of query u is the prompt's edge tokens plus the vertex tokens {s, u} (u counted
    once); edge (p, q) scores alpha / beta / gamma (p = u, q = u, else) and carries sigma / rho / omega to
    vertex v (p = v, q = v, else); vertex token t scores eta (t = u) or delta and carries mu (t = v) or nu.
    Linear attention uses the scores as weights, softmax normalises them; logit(v) = (1/tau) sum_j w_j V_j(v).
    ``row`` turns each query's logits into its row (default: the policy's probabilities)."""
    alpha, beta, gamma, eta, delta, sigma, rho, omega, mu, nu = (mp.mpf(v) if not isinstance(v, mp.mpf) else v for v in x)
    tau = mp.mpf(float(model.tau))
    n_vertices = 2 * n + model.n_isolated
    edges = [(c * n + i, c * n + i + 1) for c in range(2) for i in range(n - 1)]
    rows = []
    for u in range(n_vertices):
        tokens = [("e", e) for e in edges] + [("v", t) for t in sorted({start - 1, u})]
        scores = [
            (alpha if t[0] == u else beta if t[1] == u else gamma) if kind == "e" else (eta if t == u else delta)
            for kind, t in tokens
        ]
        if model.attention == "softmax":
            top = max(scores)
            z = mp.fsum(mp.exp(s - top) for s in scores)
            scores = [mp.exp(s - top) / z for s in scores]
        logit = []
        for v in range(n_vertices):
            values = [
                (sigma if t[0] == v else rho if t[1] == v else omega) if kind == "e" else (mu if t == v else nu)
                for kind, t in tokens
            ]
            logit.append(mp.fsum(w * val for w, val in zip(scores, values)) / tau)
        rows.append(row(logit, u, model))
    return rows


def mp_reward_trained(x, task: ChainTask, model: ModelSpec, dps: int = 60):
    """(J, 1 - J) with V trained in mpmath at ``dps`` digits (x: the ten numbers, floats or mpf)."""
    n = task.n
    with mp.workdps(dps):
        hs, qs = [], []
        for d in range(1, n):
            h, q, _ = mp_absorption(mp_chain_trained(x, n, model, n - d), n)
            hs.append(h[n - d - 1]), qs.append(q[n - d - 1])
        p = [mp.mpf(float(v)) for v in np.asarray(task.start_probs)]
        return +mp.fsum(a * b for a, b in zip(p, hs)), +mp.fsum(a * b for a, b in zip(p, qs))


def mp_reward_gradient_trained(x, task: ChainTask, model: ModelSpec, dps: int = 60):
    """dJ/dx (the ten numbers) by 4th-order central differences of J in mpmath (step 1e-15 relative to the scale of x,
    at ``dps`` + 30 digits).  Returns floats."""
    x0 = [float(v) for v in np.asarray(x, dtype=float)]
    out = []
    with mp.workdps(dps + 30):
        step = mp.mpf(10) ** -15 * max(1.0, max(abs(v) for v in x0))
        for k in range(len(x0)):

            def j_at(shift, k=k):
                y = [mp.mpf(v) for v in x0]
                y[k] += shift
                return mp_reward_trained(y, task, model, dps + 30)[0]

            d = (8 * (j_at(step) - j_at(-step)) - (j_at(2 * step) - j_at(-2 * step))) / (12 * step)
            out.append(float(d))
    return np.array(out)


# --------------------------------------------------------------------------------------------------
# mpmath reference of the policy-gradient noise moments (docs/THEORY.md §8.2)
# --------------------------------------------------------------------------------------------------


def mp_absorbing_solve(rows, n: int, costs, terminal):
    """g = cost + sum_v P(u, v) g(v) on every transient vertex by GTH state reduction (the one elimination of this
    reference, K columns; ``mp_absorption`` is its three-column case): costs[u] a list of K mpf, terminal = (values
    at a_n, values at b_n).  Returns g as a list of K-lists per vertex (the terminals' given values at a_n, b_n)."""
    absorbing = (n - 1, 2 * n - 1)
    k_cols = len(terminal[0])
    p = [dict(r) for r in rows]
    cost = [list(c) for c in costs]
    order = [v for v in range(len(rows)) if v not in absorbing]
    alive = set(order)
    saved = []
    for k in order:
        alive.discard(k)
        out = {j: w for j, w in p[k].items() if j != k and w != 0}
        s_k = mp.fsum(out.values())
        saved.append((k, out, s_k, cost[k]))
        for i in alive:
            w_ik = p[i].pop(k, 0)
            if w_ik == 0:
                continue
            f = w_ik / s_k
            for j, w in out.items():
                p[i][j] = p[i].get(j, 0) + f * w
            cost[i] = [a + f * b for a, b in zip(cost[i], cost[k])]
    g = {absorbing[0]: list(terminal[0]), absorbing[1]: list(terminal[1])}
    for k, out, s_k, c_k in reversed(saved):
        g[k] = [(c_k[c] + mp.fsum(w * g[j][c] for j, w in out.items())) / s_k for c in range(k_cols)]
    return [g[v] for v in range(len(rows))]


def _mp_logit_gradients(logits_at, x, dps: int):
    """(logits, d logits / d x_k for every k) of one chain: 4th-order central differences at ``dps`` + 40 digits, the
    step 10^-((dps + 40) / 5) (relative to |x|): truncation (step^4) and rounding (10^-(dps+40) / step) balanced, so
    the gradients keep about 4 (dps + 40) / 5 digits (a fixed step of 1e-20 kept 80, and psi = 1 - P(the dominant
    target) far below that was noise)."""
    with mp.workdps(dps + 40):
        xs = [mp.mpf(float(v)) for v in x]
        step = mp.mpf(10) ** -((dps + 40) // 5) * max(1, max(abs(v) for v in xs))
        base = logits_at(xs)
        grads = []
        for k in range(len(xs)):

            def at(shift, k=k):
                y = list(xs)
                y[k] += shift
                return logits_at(y)

            a, b, c, d = at(step), at(-step), at(2 * step), at(-2 * step)
            grads.append(
                [
                    [(8 * (a[u][v] - b[u][v]) - (c[u][v] - d[u][v])) / (12 * step) for v in range(len(base))]
                    for u in range(len(base))
                ]
            )
        return base, grads


def _mp_chain_moments(base, grads, n: int, model: ModelSpec, dps: int):
    """(h, m, M, F) at every vertex of one chain from its logits and their gradients (the recursions of §8.2)."""
    size, n_vertices = len(grads), len(base)
    with mp.workdps(dps):
        p = [_mp_policy_row(base[u], u, model) for u in range(n_vertices)]
        psi = [
            {v: [grads[k][u][v] - mp.fsum(p[u][w] * grads[k][u][w] for w in p[u]) for k in range(size)] for v in p[u]}
            for u in range(n_vertices)
        ]
        pairs = [(i, j) for i in range(size) for j in range(size)]
        zero = [mp.mpf(0)] * size
        h = [v[0] for v in mp_absorbing_solve(p, n, [[mp.mpf(0)]] * n_vertices, ([mp.mpf(1)], [mp.mpf(0)]))]
        cost_m = [[mp.fsum(w * psi[u][v][i] * h[v] for v, w in p[u].items()) for i in range(size)] for u in range(n_vertices)]
        m = mp_absorbing_solve(p, n, cost_m, (zero, zero))
        cost_big = [
            [
                mp.fsum(
                    w * (psi[u][v][i] * psi[u][v][j] * h[v] + psi[u][v][i] * m[v][j] + m[v][i] * psi[u][v][j])
                    for v, w in p[u].items()
                )
                for i, j in pairs
            ]
            for u in range(n_vertices)
        ]
        cost_f = [
            [mp.fsum(w * psi[u][v][i] * psi[u][v][j] for v, w in p[u].items()) for i, j in pairs] for u in range(n_vertices)
        ]
        zeros = [mp.mpf(0)] * len(pairs)
        big_m = mp_absorbing_solve(p, n, cost_big, (zeros, zeros))
        big_f = mp_absorbing_solve(p, n, cost_f, (zeros, zeros))
        return h, m, big_m, big_f


def mp_moments(x, task: ChainTask, model: ModelSpec, dps: int = 60, as_float: bool = True):
    """(h, m, M, F) per start distance d (entry d-1) of ``gradflow.noise.moments_per_start`` in mpmath, as float arrays
    (0 or inf beyond float64's range), or with ``as_float=False`` as object arrays of mpf (mpmath's exponent is
    unbounded: values of 1e-1310 keep their digits): the token-built chain (x: the five numbers, or the ten with V
    trained), psi(u, v) = d logit(u, v) / d theta - sum_w P(u, w) d logit(u, w) / d theta, and the three absorbing
    solves of §8.2 by GTH state reduction at ``dps`` digits."""
    n, size = task.n, len(x)
    raw = lambda logit, u, model: logit
    if model.values == "trained":
        logits_at = lambda start: lambda y: mp_chain_trained(y, n, model, start, row=raw)
    else:
        logits_at = lambda start: lambda y: _mp_chain_numbers(y, n, model, start, row=raw)
    shared = model.attention == "linear" and model.values == "fixed"
    kind = {"dtype": float} if as_float else {"dtype": object}
    out = [np.zeros(n - 1, **kind), np.zeros((n - 1, size), **kind), np.zeros((n - 1, size, size), **kind)]
    out.append(np.zeros((n - 1, size, size), **kind))
    number = float if as_float else (lambda v: +v)
    moments = _mp_chain_moments(*_mp_logit_gradients(logits_at(None), x, dps), n, model, dps) if shared else None
    for d in range(1, n):
        start = n - d
        h, m, big_m, big_f = moments or _mp_chain_moments(*_mp_logit_gradients(logits_at(start), x, dps), n, model, dps)
        u = start - 1
        out[0][d - 1] = number(h[u])
        out[1][d - 1] = [number(v) for v in m[u]]
        out[2][d - 1] = np.array([number(v) for v in big_m[u]], **kind).reshape(size, size)
        out[3][d - 1] = np.array([number(v) for v in big_f[u]], **kind).reshape(size, size)
    return out


def mp_moments_settled(
    x, task: ChainTask, model: ModelSpec, dps: int = 300, which=(1, 2, 3), digits: int = 20, max_dps: int = 20000
):
    """``mp_moments(as_float=False)`` at doubling precision until two successive precisions agree on the moments
    ``which`` (1: m, 2: M, 3: F) to ``digits`` digits of each one's largest entry per start (the scale the checks use).
    Returns (moments, dps)."""
    previous = mp_moments(x, task, model, dps, as_float=False)
    while dps < max_dps:
        dps *= 2
        current = mp_moments(x, task, model, dps, as_float=False)
        with mp.workdps(dps):
            agree = lambda new, old: (
                max(abs(a - b) for a, b in zip(new.flat, old.flat)) <= mp.mpf(10) ** -digits * max(abs(v) for v in new.flat)
            )
            settled = all(agree(current[k][d], previous[k][d]) for k in which for d in range(current[k].shape[0]))
        if settled:
            return current, dps
        previous = current
    raise RuntimeError(f"the moments did not settle to {digits} digits by {max_dps} digits of precision")
