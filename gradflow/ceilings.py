"""The reward ceiling: the supremum of the expected reward J over theta for one task and model.

Linear attention without a cap reaches 1 in the limit of forward traversal; a cap (``model.max_len``)
and softmax attention (every logit at most 1/tau) each keep the supremum below 1 (docs/THEORY.md §13).
With V trained (docs/THEORY.md §10) the value numbers are unbounded, so only the cap binds.
``reward_ceiling`` says the value and how it was found, ``max_reward`` is the value,
``closed_form_ceiling`` is the value only where it is a closed form (cheap, cached: what a solve checks
before it runs), and ``reward_ceiling_warning`` is the one-line warning for a reward level above it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import check_fraction, is_concrete
from gradflow.model import ModelSpec, Theta
from gradflow.objective import expected_reward
from gradflow.task import ChainTask

__all__ = ["RewardCeiling", "closed_form_ceiling", "max_reward", "reward_ceiling", "reward_ceiling_warning"]


def _as_model(model) -> ModelSpec:
    if model is None:
        return ModelSpec()
    if not isinstance(model, ModelSpec):
        raise ValueError(f"model must be a gradflow.ModelSpec, got {type(model).__name__}")
    return model


def _is_capped(model: ModelSpec) -> bool:
    return model.max_len is not None


@dataclass(frozen=True)
class RewardCeiling:
    """sup over theta of J(theta) for one task and model (see ``reward_ceiling``).

    value: the supremum.  exact: True when it is a closed form (a limit of theta, attained by no
    finite theta), False when it is the best of a numerical maximisation (then a lower bound of the
    supremum, to the optimiser's tolerance, which no brute-force search in the tests beat).
    method: how it was obtained.  theta: the maximising point found numerically (None for a limit).
    """

    value: float
    exact: bool
    method: str
    theta: tuple[float, ...] | None = None

    def __str__(self) -> str:
        how = "exact" if self.exact else "numerical"
        return f"reward ceiling sup J = {self.value:.10g} ({how}: {self.method})"


def _model_key(task: ChainTask, model: ModelSpec) -> tuple:
    return (
        task.n,
        tuple(np.asarray(task.start_probs, dtype=float).tolist()),
        model.attention,
        float(model.tau),
        model.mask_self,
        model.n_isolated,
        model.max_len,
        model.values,
    )


def reward_ceiling(task: ChainTask, model: ModelSpec | None = None) -> RewardCeiling:
    """The supremum of the expected reward J over theta, and how it was found.

    - Linear attention, no cap: 1 (forward traversal, alpha - gamma -> +inf, gamma -> -inf).
    - Linear attention, cap T (``model.max_len``) covering every start (p[d-1] = 0 for d > T): 1, the
      limit alpha >> 2 gamma >> 0, beta -> -inf (every step forward: no self-loop, no backward step, no
      jump).  One exception: at n = 2 with self-loops allowed the self-loop and the forward step have the
      same logit alpha for every theta, so the best is p[0] (1 - 2^-T) (each token moves with probability
      at most 1/2; a jump lands on the other chain).
    - Linear attention with starts beyond the cap: those starts still succeed by far jumps (a terminal has
      one edge, so at gamma << 0 it is a likely jump target), so forward traversal's sum_{d <= T} p[d-1] is
      only a lower bound (hardest start, n = 5, T = 3: J = 0.48 at theta = (-1.69, -0.43, -4.05)): the
      value is a numerical maximisation, as for softmax with a cap, never below that limit.
    - Softmax attention, no cap: every logit is (1/tau) times a total attention weight, at most
      1/tau.  The supremum is the limit alpha -> +inf with the others finite: each row puts all its
      weight on its outgoing edge, which writes 1/tau on the current vertex and its successor and 0
      everywhere else.  That limit walk is exactly the linear-attention walk at theta = (1, 0, 0)
      with the same tau, mask and isolated vertices (from an isolated vertex the uncapped value is
      1/2 whatever the row, by the a/b symmetry), so its J is a closed form.  That no finite theta
      does better is checked by multi-start numerical maximisation (tests; n = 8: 0.8381807686 at
      tau = 0.2, 0.9985502968 at tau = 0.1, 0.99999993404 at tau = 1/20).
    - Softmax attention with a cap: self-loops, the cap and the isolated rows make the best weights
      interior, so the value is a numerical maximisation (multi-start L-BFGS-B on theta in a box of
      +-40, which covers softmax weight ratios up to e^80, started also from the alpha -> inf point).
    - V trained (``values="trained"``, either attention), no cap or a cap covering every start: 1, the
      limit alpha -> +inf (softmax: each row's whole weight on its outgoing edge; linear: alpha >> |the
      rest|) and rho - omega -> +inf, where the successor's logit alpha (rho - omega) outgrows every other
      logit of the row (the self-loop's is alpha (sigma - omega) + (mu - nu) eta, which V trained separates
      from it even at n = 2), so every step is forward with probability -> 1 (docs/THEORY.md §10).  Starts
      beyond the cap: as for the fixed V, far jumps reach them, so the value is a numerical maximisation over
      the ten numbers, never below forward traversal's sum_{d <= T} p[d-1].
    Results are cached per (task, model).
    """
    if not isinstance(task, ChainTask):
        raise ValueError(f"task must be a gradflow.ChainTask, got {type(task).__name__}")
    model = _as_model(model)
    return _reward_ceiling_cached(_model_key(task, model))


@functools.lru_cache(maxsize=256)
def _reward_ceiling_cached(key: tuple) -> RewardCeiling:
    n, probs, attention, tau, mask_self, n_isolated, max_len, values = key
    probs = np.asarray(probs)
    task = ChainTask(n, probs)
    kwargs = dict(attention=attention, tau=tau, mask_self=mask_self, n_isolated=n_isolated, values=values)
    if max_len is not None:
        kwargs["max_len"] = max_len
    model = ModelSpec(**kwargs)
    if values == "trained":
        if max_len is None or _covered(probs, max_len):
            return RewardCeiling(1.0, True, "V trained: forward traversal limit (alpha, rho - omega -> +inf)")
        return _jump_ceiling(task, model, f"V trained, cap {max_len}, starts beyond it reached by far jumps: [-40, 40]^10")
    if attention == "linear" and max_len is None:
        return RewardCeiling(1.0, True, "linear attention: forward traversal in the limit")
    if attention == "linear":
        if n == 2 and not mask_self:
            value = float(probs[0] * (1.0 - 0.5**max_len))
            return RewardCeiling(value, True, f"n = 2, self-loops allowed: p[0] (1 - 2^-{max_len})")
        if _covered(probs, max_len):
            return RewardCeiling(1.0, True, f"cap {max_len} covers every start: forward traversal limit")
        return _jump_ceiling(task, model, f"cap {max_len}, starts beyond it reached by far jumps: theta in [-40, 40]^3")
    if max_len is None:
        limit = ModelSpec(attention="linear", tau=tau, mask_self=mask_self, n_isolated=n_isolated)
        value = float(expected_reward(Theta(1.0, 0.0, 0.0), task, limit))
        return RewardCeiling(value, True, "softmax: alpha -> +inf limit (the linear walk at theta = (1, 0, 0))")
    value, theta = _numerical_max_reward(task, model)
    return RewardCeiling(value, False, "softmax with a cap: multi-start L-BFGS-B over theta in [-40, 40]^P", theta)


def _jump_ceiling(task: ChainTask, model: ModelSpec, box: str) -> RewardCeiling:
    """Starts beyond the cap succeed only by far jumps: the best of a multi-start L-BFGS-B maximisation over ``box``,
    never below forward traversal's mass on the starts d <= T."""
    forward = float(np.asarray(task.start_probs)[: model.max_len].sum())
    value, theta = _numerical_max_reward(task, model)
    return RewardCeiling(max(value, forward), False, f"multi-start L-BFGS-B, {box}", theta if value >= forward else None)


def _covered(probs: np.ndarray, max_len: int) -> bool:
    """Every start with mass lies within the cap: p[d-1] = 0 for d > max_len."""
    return not np.any(np.asarray(probs)[max_len:] > 0)


def _numerical_max_reward(task: ChainTask, model: ModelSpec, n_starts: int = 12, bound: float = 40.0, seed: int = 0):
    """Best J over theta in [-bound, bound]^k (k = P = ``Theta.size(model.values)`` softmax or V trained, 3 linear)
    by multi-start L-BFGS-B (V trained: the deterministic starts at the fixed V)."""
    from scipy.optimize import minimize

    size = Theta.size(model.values)
    k = size if model.attention == "softmax" or model.values == "trained" else 3

    def full(x):
        return Theta.from_array(jnp.concatenate([x, jnp.zeros(size - k)]))

    value_and_grad = jax.jit(jax.value_and_grad(lambda x: -expected_reward(full(x), task, model)))

    def objective(x):
        v, g = value_and_grad(jnp.asarray(x))
        v, g = float(v), np.asarray(g, dtype=float)
        if not np.isfinite(v) or not np.all(np.isfinite(g)):
            return 0.0, np.zeros_like(g)  # J >= 0: a non-finite point is never the best
        return v, g

    rng = np.random.default_rng(seed)
    zero = np.zeros(k)
    zero[5:7] = 1.0  # V trained: sigma = rho = 1, the fixed V
    limit = zero.copy()
    limit[0] = bound
    starts = [limit, zero] + [rng.normal(scale=3.0, size=k) for _ in range(n_starts)]
    best, best_x = -np.inf, None
    for x0 in starts:
        result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[(-bound, bound)] * k)
        for x in (x0, result.x):
            value = -objective(x)[0]
            if value > best:
                best, best_x = value, x
    return float(best), tuple(float(v) for v in np.concatenate([best_x, np.zeros(size - k)]))


def max_reward(task: ChainTask, model: ModelSpec | None = None) -> float:
    """sup over theta of J(theta) on ``task`` under ``model``; see ``reward_ceiling`` for how."""
    return reward_ceiling(task, model).value


def reward_ceiling_warning(config, level: float, model: ModelSpec | None = None) -> str | None:
    """A one-line warning when the reward ``level`` lies above what the model can reach, else None.

    For the flow, ``simulate``, ``phases`` and the CLI: a level at or above the ceiling is never
    reached, whatever t1.

    Args:
        config (FlowParams | ChainTask): a ``FlowParams`` (its task and model) or a ``ChainTask`` (then
            ``model`` is used).
        level: the reward level, in [0, 1].
        model: the model when config is a ChainTask (default ``ModelSpec()``; ignored for a FlowParams).

    Returns:
        The warning text, or None when the level can be reached.

    Raises:
        ValueError: config is neither a FlowParams nor a ChainTask, or level is not in [0, 1].
    """
    if isinstance(config, ChainTask):
        task, model = config, _as_model(model)
    elif isinstance(getattr(config, "task", None), ChainTask) and isinstance(getattr(config, "model", None), ModelSpec):
        task, model = config.task, config.model  # a FlowParams (``gradflow.config`` builds on this module)
    else:
        raise ValueError(f"config must be a gradflow.FlowParams or gradflow.ChainTask, got {type(config).__name__}")
    level = check_fraction("level", level, 0.0, 1.0, inclusive=True)
    if (model.attention == "linear" or model.values == "trained") and not _is_capped(model):
        return None  # ceiling 1, and a level of 1 is refused by every caller
    ceiling = reward_ceiling(task, model)
    if level < ceiling.value:
        return None
    why = []
    if _is_capped(model):
        why.append(f"cap max_len = {model.max_len}")
    if model.attention == "softmax" and model.values == "fixed":
        why.append(f"softmax attention at tau = {float(model.tau):g} (every logit <= 1/tau)")
    if ceiling.exact:
        return (
            f"reward level {level:g} is above the reward ceiling sup J = {ceiling.value:.6g} of this model "
            f"({', '.join(why)}): it is never reached"
        )
    return (
        f"reward level {level:g} is above the reward ceiling sup J ~ {ceiling.value:.6g} of this model "
        f"({', '.join(why)}; the best of a numerical maximisation): it is not expected to be reached"
    )


def closed_form_ceiling(task: ChainTask, model: ModelSpec) -> float | None:
    """sup J where it is a closed form (linear attention without a cap or with a cap covering every start, softmax
    without a cap), else None.

    None too for a traced task or temperature.  V trained (either attention): 1 without a cap or with a cap
    covering every start, else None.  Cached per (task, model): a solve calls it before running.
    """
    if (model.attention == "linear" or model.values == "trained") and not _is_capped(model):
        return 1.0
    if not is_concrete((task.start_probs, model.tau)):
        return None
    if model.values == "trained":
        return 1.0 if _covered(np.asarray(task.start_probs), model.max_len) else None
    if _is_capped(model) and (model.attention == "softmax" or not _linear_cap_is_closed(task, model)):
        return None
    return _reward_ceiling_cached(_model_key(task, model)).value


def _linear_cap_is_closed(task: ChainTask, model: ModelSpec) -> bool:
    """Linear attention with a cap has a closed-form ceiling when the cap covers every start, or at n = 2 with
    self-loops allowed (``reward_ceiling``); with starts beyond the cap it is a numerical maximisation."""
    return _covered(np.asarray(task.start_probs), model.max_len) or (task.n == 2 and not model.mask_self)
