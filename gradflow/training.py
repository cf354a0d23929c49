"""Discrete training: exact-gradient descent with any optax optimizer, and sampled REINFORCE.

``gradient_descent`` ascends the exact reward J (capped when ``model.max_len`` is set, see
``gradflow.capped``) with one ``lax.scan``; ``train`` ascends the REINFORCE estimate of sampled
rollouts (leave-one-out baseline, ``gradflow.sampling``).  Both record theta, J and the read-outs
(closed form, capped when the model is, and greedy decoding) at every step, as a
``TrainingTrajectory`` on the time axis t_k = t0 + lr * k.

Time axes.  SGD with rate lr is the gradient flow sampled at t = lr * k, up to O(lr) (docs/THEORY.md §4.4).
Adam is not: its step is lr * m_k / (sqrt(v_k) + eps), a per-coordinate rescaling of the gradient
by a running root-mean-square, so while a coordinate's gradient keeps its sign each coordinate moves
about lr per step whatever the gradient's size (the flow of sign(grad J), not of grad J), and the
size of the gradient only shows when it changes sign or shrinks below eps.  So t = lr * k for Adam
is "distance a coordinate may have moved", not flow time: Adam on the exact gradient is the
noise-free counterpart of the authors' runs (REINFORCE + Adam), and it escapes plateaus where the
flow crawls (a tiny gradient is amplified to a step of ~lr).  ``coords="full"`` divides each
coordinate's gradient by its orbit size s_k (entries per query row: the flow of the full matrices on
the symmetric subspace, docs/THEORY.md §4.2); for SGD this rescales time per coordinate.

Adam in full coordinates is the authors' optimizer: Adam on every entry of the matrices (A, and V
when ``model.values == "trained"``) with per-entry moments and eps = 1e-8 per entry.  From a symmetric
start every entry of orbit k has the same gradient, g_k / (N s_k) (N s_k entries share the number,
N the vocabulary size), so the entries' moments stay equal within each orbit and per-entry Adam is
Adam on the orbit coordinates fed g_k / (N s_k).  The full coordinates feed N times that (g_k / s_k,
the flow's vector field), and Adam is exactly invariant to that scale when its eps is scaled too, so
``optimizer="adam"`` (by name) with ``coords="full"`` is ``optax.adam(lr, eps=N * 1e-8)`` on g / s:
per-entry Adam with eps = 1e-8, tested against optax.adam on the full dense matrices.  This is not
Adam on the orbit coordinates (``coords="reduced"``): there eps meets the orbit gradient g_k, N s_k
times larger than an entry's, which matters while gradients are below ~1e-8 (the authors' start).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import objective, readouts
from gradflow._checks import check_choice, check_int, check_positive
from gradflow._deprecated import module_getattr, renamed_keyword
from gradflow._imports import optax  # a stand-in: optax is imported when first read
from gradflow.compile_cache import compiled
from gradflow.config import config_label, extended_config, extended_configs
from gradflow.flow import FlowParams, Trajectory, stack_configs
from gradflow.model import ModelSpec, Theta
from gradflow.readouts import RECORDED  # TrainingTrajectory's read-outs
from gradflow.sampling import full_attention, full_values, orbit_statistics, resolve_max_len, rollouts, surrogate
from gradflow.task import ChainTask

OPTIMIZERS = ("sgd", "adam")  # the common ones; any optax optimizer name is accepted
COORDS = ("reduced", "full")
ADAM_EPS = 1e-8  # optax.adam's default eps, and the authors' (per matrix entry)

__getattr__ = module_getattr(__name__)  # deprecated names (gradflow._deprecated)

__all__ = [
    "TrainConfig",
    "TrainingTrajectory",
    "gradient_descent",
    "gradient_descent_many",
    "train",
    "readouts_at",
    "reward_function",
    "OPTIMIZERS",
    "COORDS",
    "ADAM_EPS",
    "RECORDED",
    "EVAL_RECORDED",
]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _check_optimizer(optimizer) -> None:
    if isinstance(optimizer, optax.GradientTransformation):
        return
    if not isinstance(optimizer, str) or not callable(getattr(optax, optimizer, None)) or optimizer.startswith("_"):
        raise ValueError(
            f"optimizer must be an optax optimizer name such as {list(OPTIMIZERS)} "
            f"(or an optax.GradientTransformation), got {optimizer!r}"
        )


def _make_optimizer(optimizer, lr, entries: int = 1) -> optax.GradientTransformation:
    """An optax transformation: ``optax.<name>(lr)`` for a name, or the given transformation.  "adam" by name
    gets eps = ``entries`` * ADAM_EPS: fed ``entries`` times the gradient of one entry (full coordinates),
    it is per-entry Adam with eps = ADAM_EPS (module docstring)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adam":
        return optax.adam(lr, eps=ADAM_EPS * entries)
    try:
        return getattr(optax, optimizer)(lr)
    except TypeError as error:
        raise ValueError(f"optimizer {optimizer!r}: optax.{optimizer}(learning_rate) failed ({error})") from error


@dataclass(frozen=True)
class TrainConfig:
    """Settings of discrete training (the problem itself, task/model/theta0/schedule, is a FlowParams).

    lr: step size; steps: number of updates; batch: rollouts per step (sampled ``train`` only);
    optimizer: "sgd", "adam" or any optax optimizer name (``optax.<name>(lr)``), or an
    ``optax.GradientTransformation`` (then ``lr`` only sets the time axis, and each new instance
    recompiles); coords: "reduced" (the five numbers) or "full" (sampled: the full matrix A;
    exact: the full-matrix flow, gradient divided by orbit sizes; None, the default: "reduced" for
    sampled training, the FlowParams' coords for exact gradient descent);
    max_len: rollout cap of sampled training (None: ``sampling.resolve_max_len``, i.e. the model's
    cap if set, else 50 n).
    """

    lr: float
    steps: int
    batch: int | None = None
    optimizer: object = "sgd"
    coords: str | None = None
    max_len: int | None = None

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_int("steps", self.steps, 1)
        if self.batch is not None:
            check_int("batch", self.batch, 2)
        _check_optimizer(self.optimizer)
        if self.coords is not None:
            check_choice("coords", self.coords, COORDS)
        if self.max_len is not None:
            check_int("max_len", self.max_len, 1)


# --------------------------------------------------------------------------------------------------
# Read-outs (capped when the model is)
# --------------------------------------------------------------------------------------------------


def reward_function(model: ModelSpec):
    """J(theta, task, model): ``gradflow.objective.expected_reward``, which is the capped reward of
    ``gradflow.capped`` when ``model.max_len`` is set (the one dispatch)."""
    return objective.expected_reward


EVAL_RECORDED = (
    "reward",
    "greedy_accuracy",
    "greedy_conditional_accuracy",
    "greedy_reach_rate",
    "greedy_traversal_accuracy",
)  # recorded on every eval task: the authors' read-outs (reward, greedy accuracy given a terminal, reach, traversal)


def readouts_at(task: ChainTask, model: ModelSpec, theta: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The read-outs ``RECORDED`` of ``gradflow.readouts`` at one theta (P,), capped when ``model.max_len`` is set
    (NaN for those without a closed form for the model: ``readouts.covers``).

    reward, forward_prob and switch_prob per position (given that the walk moves), expected_length
    (E[min(L, max_len)] with a cap), traversal_prob, success_per_start, reach_per_start and
    reach_probability (1 without a cap), and the greedy read-outs (``gradflow.greedy``, tie rule
    "first"): greedy_accuracy, greedy_conditional_accuracy, greedy_reach_rate,
    greedy_traversal_accuracy, greedy_tie_rate and greedy_correct / greedy_reached per start.
    """
    return readouts.read_covered(RECORDED, theta, task, model)


# --------------------------------------------------------------------------------------------------
# The trajectory
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingTrajectory(Trajectory):
    """Discrete training, recorded at ts = t0 + lr * step, step = 0..steps; a flow ``Trajectory`` plus:

    sampled_reward (T,): mean reward of the batch drawn at that step (NaN for exact gradient
    descent); theta_std (T, P): within-orbit standard deviation of A (0 when training the five
    numbers); success_per_start, reach_per_start (T, n-1) and reach_probability (T,): exact
    (capped) read-outs; greedy_* : greedy decoding read-outs (``gradflow.greedy``, tie rule
    "first"), scalars (T,) and greedy_correct / greedy_reached per start (T, n-1).  theta is the
    five numbers (coords="full" in sampled training: the orbit means of A) and every exact field is
    evaluated there, on ``config.task``, capped when ``config.model.max_len`` is set.  events: first
    recorded time the exact reward reaches the config's reward_threshold / 1 - convergence_loss.
    eval_readouts: name -> {read-out: (T,)} of ``EVAL_RECORDED`` on each of ``config.eval_tasks``
    (eval_reward[name] is its "reward").  ``save``/``load`` as a flow ``Trajectory`` (npz + JSON).
    """

    sampled_reward: np.ndarray | None = None
    theta_std: np.ndarray | None = None
    success_per_start: np.ndarray | None = None
    reach_per_start: np.ndarray | None = None
    reach_probability: np.ndarray | None = None
    greedy_accuracy: np.ndarray | None = None
    greedy_conditional_accuracy: np.ndarray | None = None
    greedy_reach_rate: np.ndarray | None = None
    greedy_traversal_accuracy: np.ndarray | None = None
    greedy_tie_rate: np.ndarray | None = None
    greedy_correct: np.ndarray | None = None
    greedy_reached: np.ndarray | None = None
    eval_readouts: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    ARRAYS = Trajectory.ARRAYS + ("sampled_reward", "theta_std") + tuple(n for n in RECORDED if n not in Trajectory.ARRAYS)

    @property
    def steps(self) -> np.ndarray:
        """The step index k of every record (0..steps)."""
        return np.arange(self.ts.shape[0])

    def t_hit(self, level: float) -> float | None:
        """First recorded step time with exact reward >= ``level`` (no flow re-solve), None if never."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        return _first_time(self.ts, self.reward, level)

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        return {f"eval/{name}/{k}": np.asarray(v) for name, values in self.eval_readouts.items() for k, v in values.items()}

    @classmethod
    def _extra_fields(cls, data, eval_names) -> dict:
        found = {name: {} for name in eval_names}
        for key in data.files:
            if key.startswith("eval/"):
                name, _, readout = key.removeprefix("eval/").rpartition("/")
                found.setdefault(name, {})[readout] = data[key]
        return {"eval_readouts": found}

    @classmethod
    def _n_saves(cls, config: FlowParams, arrays: dict) -> int:
        return int(np.shape(arrays["ts"])[0])  # steps + 1, whatever the config's save times


def _first_time(ts: np.ndarray, reward: np.ndarray, level: float) -> float | None:
    """First recorded t with reward >= level (no interpolation: a step time), None if never."""
    hit = np.nonzero(np.asarray(reward) >= level)[0]
    return float(ts[hit[0]]) if hit.size else None


def _check_finite(what: str, flow_params: FlowParams, ts: np.ndarray, record: dict, grad_finite: np.ndarray) -> None:
    """RuntimeError at the first step whose exact reward J or gradient is NaN or infinite, naming the
    config (``config_label``), the step, its time and theta."""
    bad = ~np.isfinite(record["reward"]) | ~grad_finite
    if not bad.any():
        return
    k = int(np.argmax(bad))
    which = "reward J" if not np.isfinite(record["reward"][k]) else "gradient"
    raise RuntimeError(
        f"{what}: {config_label(flow_params)}: the {which} is not finite (reward {float(record['reward'][k])}) at step {k}, "
        f"t = {float(ts[k]):.6g}, theta = {np.round(record['theta'][k], 6).tolist()}: the closed form cannot be evaluated there"
    )


def _finite_record(flow_params: FlowParams, run) -> tuple[dict, str]:
    """(run(flow_params), "float64"), or where its J or gradient is not finite and the closed form can take
    extended numbers, (run(the config in extended numbers), "extended") (``extended_config``): a run's record on
    the host, and the numbers it was computed in."""
    record = jax.device_get(run(flow_params))
    extended = extended_config(flow_params)
    if extended is None or _finite(record):
        return record, flow_params.model.numbers
    return jax.device_get(run(extended)), "extended"


def _finite(record: dict) -> bool:
    """Whether a run's exact reward J and gradient are finite at every step."""
    return bool(np.all(np.isfinite(record["reward"])) and np.all(record["grad_finite"]))


def _make_trajectory(what: str, flow_params: FlowParams, lr, record: dict, stats: dict) -> TrainingTrajectory:
    record = jax.device_get(record)
    evals = {name: {k: np.asarray(v) for k, v in values.items()} for name, values in record.pop("eval").items()}
    record = {k: np.asarray(v) for k, v in record.items()}
    ts = np.asarray(float(flow_params.t0) + float(lr) * np.arange(record["theta"].shape[0]))
    _check_finite(what, flow_params, ts, record, record.pop("grad_finite"))
    events = {
        "reward_threshold": _first_time(ts, record["reward"], float(flow_params.reward_threshold)),
        "converged": _first_time(ts, record["reward"], 1.0 - float(flow_params.convergence_loss)),
    }
    eval_reward = {name: values["reward"] for name, values in evals.items()}
    return TrainingTrajectory(
        config=flow_params, ts=ts, events=events, stats=stats, eval_reward=eval_reward, eval_readouts=evals, **record
    )


def _readouts_along(flow_params: FlowParams, thetas: jnp.ndarray) -> dict:
    """``readouts_at`` at every recorded theta, and ``EVAL_RECORDED`` on every eval task (under "eval")."""
    task, model = flow_params.task, flow_params.model
    record = jax.vmap(lambda x: readouts_at(task, model, x))(thetas)
    evals = {
        name: jax.vmap(lambda x, t=eval_task: readouts.read_covered(EVAL_RECORDED, x, t, model))(thetas)
        for name, eval_task in flow_params.eval_tasks.items()
    }
    return record | {"eval": evals}


@eqx.filter_jit
def _metrics_along(flow_params: FlowParams, thetas: jnp.ndarray) -> dict:
    """``_readouts_along``, compiled apart from the training scan, so runs that differ only in optimizer,
    steps' values or coords share it."""
    return _readouts_along(flow_params, thetas)


# --------------------------------------------------------------------------------------------------
# Exact-gradient training
# --------------------------------------------------------------------------------------------------


def exact_gradient(flow_params: FlowParams, t, theta: jnp.ndarray, coords: str = "reduced") -> jnp.ndarray:
    """grad J at the training task of time t (capped if the model is): the flow's vector field in ``coords``.

    Args:
        flow_params: the config (task, schedule, model).
        t (float | jax.Array): the time that picks the training distribution.
        theta: the parameters as an array of shape (P,), P = ``Theta.size(model.values)`` (5, or 10 with V trained).
        coords: "reduced" (grad J) or "full" (grad J divided by the orbit sizes, ``FlowParams.vector_field``).

    Returns:
        The gradient, an array of shape (P,).
    """
    return flow_params.vector_field(t, theta, coords=coords)


def _descent(flow_params, lr, steps: int, optimizer, coords: str) -> dict:
    """The exact-gradient scan: theta_0 .. theta_steps (traceable; vmapped by ``gradient_descent_many``)."""
    opt = _make_optimizer(optimizer, lr, flow_params.vocabulary_size if coords == "full" else 1)

    def step(carry, k):
        theta, opt_state = carry
        grad = exact_gradient(flow_params, flow_params.t0 + lr * k, theta, coords)
        updates, opt_state = opt.update(-grad, opt_state, theta)
        return (optax.apply_updates(theta, updates), opt_state), (theta, jnp.all(jnp.isfinite(grad)))

    theta0 = flow_params.theta0.as_array(flow_params.model.values)
    (final, _), (thetas, finite) = jax.lax.scan(step, (theta0, opt.init(theta0)), jnp.arange(steps))
    thetas = jnp.concatenate([thetas, final[None]])
    return {
        "theta": thetas,
        "theta_std": jnp.zeros_like(thetas),
        "sampled_reward": jnp.full(steps + 1, jnp.nan),
        "grad_finite": jnp.concatenate([finite, jnp.array([True])]),
    }


_gradient_descent = eqx.filter_jit(_descent)


def _config(config, **given) -> TrainConfig:
    """A TrainConfig from ``config`` with the explicitly given (non-None) fields replaced."""
    given = {k: v for k, v in given.items() if v is not None}
    if config is None:
        missing = [k for k in ("lr", "steps") if k not in given]
        if missing:
            raise ValueError(f"{missing[0]} is required (or pass config=TrainConfig(...))")
        return TrainConfig(**given)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a gradflow.training.TrainConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **given)


def gradient_descent(
    flow_params: FlowParams,
    lr: float | None = None,
    steps: int | None = None,
    optimizer=None,
    coords: str | None = None,
    *,
    config: TrainConfig | None = None,
) -> TrainingTrajectory:
    """Exact-gradient ascent on J from ``flow_params.theta0``: theta_{k+1} = optimizer(theta_k, grad J).

    grad J is the exact gradient at the training task of time t_k = t0 + lr k (a schedule is
    honoured), of the capped reward when ``flow_params.model.max_len`` is set.  Settings may come from
    ``config`` (a TrainConfig; explicit arguments win).  One scan over the steps, compiled once per
    structure.

    Args:
        flow_params: the config to train (task, model, theta0, schedule, eval_tasks).
        lr: the learning rate (required unless config gives it).
        steps: the number of steps (required unless config gives it).
        optimizer (str | optax.GradientTransformation | None): "sgd" (default: theta_{k+1} = theta_k + lr grad J,
            the flow sampled at t = lr k), "adam" (with coords="full": the authors' per-entry Adam, module
            docstring) or any optax name, or an optax transformation.
        coords: "reduced" or "full" (default: ``flow_params.coords``).
        config: a ``TrainConfig`` holding the settings not given explicitly.

    Returns:
        A ``TrainingTrajectory`` with steps + 1 points (theta_0 .. theta_steps), with every read-out of
        ``readouts_at`` and ``EVAL_RECORDED`` on each of ``flow_params.eval_tasks`` (V trained,
        ``model.values == "trained"``: theta holds the ten numbers, and the read-outs without a closed
        form for it, ``readouts.covers``, are NaN).

    Raises:
        ValueError: lr or steps missing (and no config), config is not a TrainConfig, or a setting is invalid.
        RuntimeError: J or grad J is NaN or infinite at some step; the message names the config, the
            step, its time and theta.
    """
    cfg = _config(config, lr=lr, steps=steps, optimizer=optimizer, coords=coords)
    coords = cfg.coords or flow_params.coords
    start = time.perf_counter()

    def descent(params):
        record = _gradient_descent(params, jnp.asarray(cfg.lr, dtype=float), cfg.steps, cfg.optimizer, coords)
        return record | _metrics_along(params, record["theta"])

    record, numbers = _finite_record(flow_params, descent)
    stats = {
        "numbers": numbers,
        "seconds": time.perf_counter() - start,
        "lr": float(cfg.lr),
        "steps": cfg.steps,
        "optimizer": _optimizer_name(cfg.optimizer),
        "coords": coords,
        "max_len": flow_params.model.max_len,
    }
    return _make_trajectory("gradient_descent", flow_params, cfg.lr, record, stats)


def gradient_descent_many(
    configs,
    lrs=None,
    steps: int | None = None,
    optimizer=None,
    coords: str | None = None,
    *,
    config: TrainConfig | None = None,
) -> list[TrainingTrajectory]:
    """``gradient_descent`` of many configs and learning rates in one vmapped compilation.

    Each result equals ``gradient_descent(configs[i], lrs[i], ...)`` to round-off; a grid over n needs
    one call per n.

    Args:
        configs (Sequence[FlowParams]): FlowParams of one structure (``flow.stack_configs``: same n, model
            kind, eval task names, ...; theta0, task probabilities, tau, schedule numbers may differ).
        lrs (float | Sequence[float] | None): one rate for every config or one per config (default: ``config.lr``).
        steps: the number of steps (required unless config gives it).
        optimizer (str | None): an optax name, the same for all (default "sgd").
        coords: "reduced" or "full" (default: the first config's coords).
        config: a ``TrainConfig`` holding the settings not given explicitly.

    Returns:
        One ``TrainingTrajectory`` per config, in order.

    Raises:
        ValueError: configs is empty or differ in structure, lrs has the wrong shape or a rate is not
            positive, the optimizer is not an optax name, or steps is missing.
        RuntimeError: J or grad J is NaN or infinite at some step of some config.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("configs must hold at least one FlowParams")
    rates = np.asarray(config.lr if lrs is None and config is not None else lrs, dtype=float)
    if rates.ndim > 1 or (rates.ndim == 1 and rates.shape[0] != len(configs)):
        raise ValueError(f"lrs must be one number or one per config ({len(configs)}), got shape {rates.shape}")
    rates = np.broadcast_to(rates, (len(configs),))
    for rate in rates:
        check_positive("lrs entry", float(rate))
    cfg = _config(config, lr=float(rates[0]), steps=steps, optimizer=optimizer, coords=coords)
    if not isinstance(cfg.optimizer, str):
        raise ValueError(f"gradient_descent_many needs an optax optimizer name (one compilation), got {cfg.optimizer!r}")
    coords = cfg.coords or configs[0].coords
    records, stats = _many_records(configs, rates, cfg, coords)
    numbers = [config.model.numbers for config in configs]
    extended = extended_configs(configs, [i for i, record in enumerate(records) if not _finite(record)])
    if extended:  # members with a NaN in float64 numbers: run again, in a batch of their own, in extended numbers
        again, _ = _many_records(list(extended.values()), rates[list(extended)], cfg, coords)
        for i, record in zip(extended, again):
            records[i], numbers[i] = record, "extended"
    trajectories = []
    for flow_params, rate, record, kind in zip(configs, rates, records, numbers):
        member = stats | {"numbers": kind, "lr": float(rate), "max_len": flow_params.model.max_len}
        trajectories.append(_make_trajectory("gradient_descent_many", flow_params, rate, record, member))
    return trajectories


def _many_records(configs: list[FlowParams], rates: np.ndarray, cfg: TrainConfig, coords: str) -> tuple[list, dict]:
    """``gradient_descent_many``'s vmapped run: each member's record on the host, and the batch's stats."""
    batch = stack_configs(configs)

    def run(batch, rates):
        def one(flow_params, lr):
            record = _descent(flow_params, lr, cfg.steps, cfg.optimizer, coords)
            return record | _readouts_along(flow_params, record["theta"])

        return jax.vmap(one)(batch, rates)

    start = time.perf_counter()
    args = (batch, jnp.asarray(rates))
    executable, compile_s = compiled("gradient_descent_many", run, args, (cfg.steps, cfg.optimizer, coords), export=True)
    out = jax.device_get(executable(*args))
    stats = {
        "seconds": time.perf_counter() - start,
        "compile_seconds": compile_s,
        "batch": len(configs),
        "steps": cfg.steps,
        "optimizer": cfg.optimizer,
        "coords": coords,
    }
    return [jax.tree_util.tree_map(lambda v, i=i: v[i], out) for i in range(len(configs))], stats


def _optimizer_name(optimizer) -> str:
    return optimizer if isinstance(optimizer, str) else type(optimizer).__name__


# --------------------------------------------------------------------------------------------------
# Sampled REINFORCE
# --------------------------------------------------------------------------------------------------


@eqx.filter_jit
def _train(flow_params, params0, key, lr, steps: int, batch: int, max_len: int, optimizer, kind: str):
    model, n_vocab = flow_params.model, flow_params.vocabulary_size
    opt = _make_optimizer(optimizer, lr)
    trained = model.values == "trained"

    def matrices(p):
        """(A, V) of the parameters: the full matrices themselves (V None with the fixed V), or built from theta."""
        if kind == "full":
            return p if trained else (p, None)
        theta = Theta.from_array(p)
        return full_attention(theta, n_vocab), full_values(theta, n_vocab) if trained else None

    def orbit(p):
        return orbit_statistics(*matrices(p)) if kind == "full" else (p, jnp.zeros_like(p))

    def step(carry, inputs):
        params, opt_state = carry
        step_key, k = inputs
        task = flow_params.training_task(flow_params.t0 + lr * k)
        A, V = jax.lax.stop_gradient(matrices(params))
        ro = rollouts(A, task, model, step_key, batch, max_len, V)

        def loss(p):
            A, V = matrices(p)
            return surrogate(A, ro, task.n, model, V)

        grad = jax.grad(loss)(params)
        updates, opt_state = opt.update(jax.tree.map(jnp.negative, grad), opt_state, params)
        theta, spread = orbit(params)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad)]))
        record = {"theta": theta, "theta_std": spread, "sampled_reward": jnp.mean(ro.rewards), "grad_finite": finite}
        return (optax.apply_updates(params, updates), opt_state), record

    inputs = (jax.random.split(key, steps + 1), jnp.arange(steps + 1))
    _, record = jax.lax.scan(step, (params0, opt.init(params0)), inputs)
    return record


def train(
    flow_params: FlowParams,
    lr: float | None = None,
    steps: int | None = None,
    batch: int | None = None,
    key=None,
    optimizer=None,
    coords: str | None = None,
    max_len: int | None = None,
    *,
    config: TrainConfig | None = None,
    params: str | None = None,
) -> TrainingTrajectory:
    """Sampled policy-gradient ascent on J from ``flow_params.theta0``: x_{k+1} = optimizer(x_k, g_k).

    g_k = grad of ``sampling.surrogate`` (REINFORCE, leave-one-out baseline) on a fresh batch of
    rollouts of the training task at t_k (``flow_params.training_task``: a schedule is honoured),
    w.r.t. the five numbers (coords="reduced", default) or the full matrix A (coords="full", started
    at full_attention(theta0, N), N = flow_params.vocabulary_size).  V trained (``model.values ==
    "trained"``): the ten numbers, or the full A and V (``sampling.full_values``; recorded theta: the
    orbit means of both).  At a symmetric A the expected
    full gradient is g_k / (N * orbit size) per entry, so SGD on A with rate lr follows the flow
    with coords="full" at t = lr * step / N.  Settings may come from ``config`` (a TrainConfig;
    explicit arguments win).  One scan over steps, compiled once.

    Args:
        flow_params: the config to train (task, model, theta0, schedule, eval_tasks).
        lr: the learning rate (required unless config gives it).
        steps: the number of steps (required unless config gives it).
        batch: rollouts per step, >= 2 (required unless config gives it).
        key (jax.Array): the jax.random key of the rollouts (required).
        optimizer (str | optax.GradientTransformation | None): "sgd" (default), "adam" or any optax name,
            or an optax transformation.
        coords: "reduced" (the five numbers) or "full" (the matrix A).
        max_len: the rollouts' cap (default: the model's ``max_len`` if set, else 50 n;
            ``sampling.resolve_max_len``).
        config: a ``TrainConfig`` holding the settings not given explicitly.
        params: the deprecated name of ``coords``.

    Returns:
        A ``TrainingTrajectory`` with steps + 1 points (the last batch is drawn at the final parameters
        and not applied); the exact read-outs are those of ``readouts_at``, and ``EVAL_RECORDED`` on each
        of ``flow_params.eval_tasks``.

    Raises:
        ValueError: key, batch, lr or steps missing, or a setting is invalid.
        RuntimeError: the exact J or the sampled gradient is NaN or infinite at some step; the message
            names the config, the step, its time and theta.
    """
    if params is not None:
        check_choice("params", params, COORDS)
    coords = renamed_keyword("gradflow.training.train(params=)", params, coords)
    if key is None:
        raise ValueError("key (a jax.random key) is required")
    cfg = _config(config, lr=lr, steps=steps, batch=batch, optimizer=optimizer, coords=coords, max_len=max_len)
    if cfg.batch is None:
        raise ValueError("batch is required for sampled training (rollouts per step, >= 2)")
    kind = cfg.coords or "reduced"
    cap = resolve_max_len(flow_params.task, flow_params.model, cfg.max_len)
    params0 = flow_params.theta0.as_array(flow_params.model.values)
    if kind == "full":
        params0 = full_attention(flow_params.theta0, flow_params.vocabulary_size)
        if flow_params.model.values == "trained":
            params0 = (params0, full_values(flow_params.theta0, flow_params.vocabulary_size))
    start = time.perf_counter()
    record = _train(flow_params, params0, key, jnp.asarray(cfg.lr, dtype=float), cfg.steps, cfg.batch, cap, cfg.optimizer, kind)
    record, numbers = _finite_record(flow_params, lambda params: record | _metrics_along(params, record["theta"]))
    stats = {
        "numbers": numbers,
        "seconds": time.perf_counter() - start,
        "lr": float(cfg.lr),
        "steps": cfg.steps,
        "batch": cfg.batch,
        "optimizer": _optimizer_name(cfg.optimizer),
        "coords": kind,
        "params": kind,
        "max_len": cap,
    }
    return _make_trajectory("train", flow_params, cfg.lr, record, stats)
