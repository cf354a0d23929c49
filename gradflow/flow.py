"""Continuous-time gradient flow d theta/dt = grad J(theta), integrated with diffrax (THEORY.md 4).

``simulate(flow_params)`` solves one config; ``simulate_many(configs)`` stacks configs of one
structure (same n, attention kind, solver, coords, ...) on a leading axis and solves them under one
vmapped compilation.  Every number in a config is a traced array: changing it never recompiles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from gradflow._checks import check_choice, check_int, check_positive, is_concrete
from gradflow.model import ModelSpec, Theta, step_probabilities
from gradflow.objective import expected_length, expected_reward, traversal_probability
from gradflow.task import ChainTask

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "kvaerno5": diffrax.Kvaerno5,
}
COORDS = ("reduced", "full")
STOP_AT = (None, "threshold", "converged")
N_DEFAULT_SAVES = 200
BISECTION_STEPS = 60
LOCAL_MAX_STEPS = 16_384  # dense re-solve of one bracket in Trajectory.t_hit
BRACKET_MAX_STEPS = 128  # the same inside the (vmapped) solve; a bracket needing more falls back to t_hit
METRIC_CHUNK_ELEMENTS = 4096


def _as_float_array(x) -> jnp.ndarray:
    return jnp.asarray(x, dtype=float)


def _optional_float_array(x):
    return None if x is None else jnp.asarray(x, dtype=float)


class FlowParams(eqx.Module):
    """One gradient-flow run: task, model, start theta0, time span and solver settings.

    Structural (static; changing them recompiles): task.n, model kinds, coords, n_vocab, solver,
    max_steps, schedule, stop_at, whether save_ts is given and its length.  Everything else is traced.
    coords "full": each coordinate's rate is divided by its orbit size in the full N x N(N-1)+N matrix
    (alpha, beta: N-1; gamma: (N-1)(N-2); eta: 1; delta: N-1), N = n_vocab or 2n + n_isolated.
    save_ts None: t0 plus 200 log-spaced times from (t1-t0)*1e-6 to t1.  schedule: t -> start_probs,
    a curriculum; the flow ascends J at schedule(t) while the trajectory reports J on ``task``.
    stop_at: None (integrate to t1), "threshold" (stop when J reaches reward_threshold) or "converged"
    (stop when the loss 1 - J falls below convergence_loss); saves after the stop are NaN.
    """

    task: ChainTask
    model: ModelSpec = ModelSpec()
    theta0: Theta = Theta(0.3, 0.0, 0.0)
    t0: jnp.ndarray = eqx.field(converter=_as_float_array, default=0.0)
    t1: jnp.ndarray = eqx.field(converter=_as_float_array, default=1e4)
    coords: str = eqx.field(static=True, default="reduced")
    n_vocab: int | None = eqx.field(static=True, default=None)
    solver: str = eqx.field(static=True, default="tsit5")
    rtol: jnp.ndarray = eqx.field(converter=_as_float_array, default=1e-8)
    atol: jnp.ndarray = eqx.field(converter=_as_float_array, default=1e-10)
    save_ts: jnp.ndarray | None = eqx.field(converter=_optional_float_array, default=None)
    max_steps: int = eqx.field(static=True, default=1_000_000)
    reward_threshold: jnp.ndarray = eqx.field(converter=_as_float_array, default=0.9)
    schedule: Callable[[jnp.ndarray], jnp.ndarray] | None = eqx.field(static=True, default=None)
    convergence_loss: jnp.ndarray = eqx.field(converter=_as_float_array, default=1e-3)
    stop_at: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.task, ChainTask):
            raise ValueError(f"task must be a gradflow.ChainTask, got {type(self.task).__name__}")
        check_choice("coords", self.coords, COORDS)
        check_choice("solver", self.solver, tuple(SOLVERS))
        check_choice("stop_at", self.stop_at, STOP_AT)
        check_int("max_steps", self.max_steps, 1)
        if self.n_vocab is not None:
            check_int("n_vocab", self.n_vocab, 2 * self.task.n + self.model.n_isolated)
        check_positive("rtol", self.rtol)
        check_positive("atol", self.atol)
        check_positive("convergence_loss", self.convergence_loss)
        if not is_concrete((self.t0, self.t1, self.save_ts, self.reward_threshold, self.theta0)):
            return
        if not np.all(np.isfinite(np.asarray(self.theta0.as_array()))):
            raise ValueError(f"theta0 must be finite, got {self.theta0.as_array()}")
        if not float(self.t1) > float(self.t0):
            raise ValueError(f"t1 must be > t0, got t0={float(self.t0)}, t1={float(self.t1)}")
        if not 0.0 < float(self.reward_threshold) < 1.0:
            raise ValueError(f"reward_threshold must lie in (0, 1), got {float(self.reward_threshold)}")
        if self.save_ts is not None:
            ts = np.asarray(self.save_ts)
            if ts.ndim != 1 or ts.size < 2:
                raise ValueError(f"save_ts must be a 1-D array of at least 2 times, got shape {ts.shape}")
            if ts.min() < float(self.t0) or ts.max() > float(self.t1):
                raise ValueError(f"save_ts must lie in [t0, t1] = [{float(self.t0)}, {float(self.t1)}]")
            if np.any(np.diff(ts) <= 0):
                raise ValueError("save_ts must be strictly increasing")

    def event_level(self, event: str) -> jnp.ndarray:
        """The reward level of an event: reward_threshold for "threshold", 1 - convergence_loss for "converged"."""
        return self.reward_threshold if event == "threshold" else 1.0 - self.convergence_loss

    @property
    def vocabulary_size(self) -> int:
        """N, the number of vertex tokens the full matrix A is over."""
        return self.n_vocab or 2 * self.task.n + self.model.n_isolated

    def orbit_sizes(self) -> jnp.ndarray:
        """Entries per query row of A that share each of the five numbers (THEORY.md section 4)."""
        big_n = self.vocabulary_size
        return jnp.array([big_n - 1, big_n - 1, (big_n - 1) * (big_n - 2), 1, big_n - 1], dtype=float)

    def times(self) -> jnp.ndarray:
        """The save times: ``save_ts`` or t0 followed by 200 log-spaced times up to t1."""
        if self.save_ts is not None:
            return self.save_ts
        span = self.t1 - self.t0
        logspaced = jnp.minimum(self.t0 + jnp.geomspace(span * 1e-6, span, N_DEFAULT_SAVES), self.t1)
        return jnp.concatenate([self.t0[None], logspaced])

    def training_task(self, t) -> ChainTask:
        """The start distribution the flow ascends at time t (``task`` unless a schedule is given)."""
        return self.task if self.schedule is None else ChainTask(self.task.n, self.schedule(t))

    def vector_field(self, t, y, args=None) -> jnp.ndarray:
        """d theta/dt = grad J(theta) at the training distribution of time t (scaled for coords)."""
        grad = jax.grad(lambda x: expected_reward(Theta.from_array(x), self.training_task(t), self.model))(y)
        return grad / self.orbit_sizes() if self.coords == "full" else grad

    def to_dict(self) -> dict:
        """A JSON-ready description (a schedule is recorded by name only)."""
        return {
            "task": {"n": self.task.n, "start_probs": np.asarray(self.task.start_probs).tolist()},
            "model": {
                "attention": self.model.attention,
                "tau": float(self.model.tau),
                "mask_self": self.model.mask_self,
                "n_isolated": self.model.n_isolated,
                "context": self.model.context,
            },
            "theta0": np.asarray(self.theta0.as_array()).tolist(),
            "t0": float(self.t0),
            "t1": float(self.t1),
            "coords": self.coords,
            "n_vocab": self.n_vocab,
            "solver": self.solver,
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            "save_ts": None if self.save_ts is None else np.asarray(self.save_ts).tolist(),
            "max_steps": self.max_steps,
            "reward_threshold": float(self.reward_threshold),
            "schedule": None if self.schedule is None else getattr(self.schedule, "__name__", repr(self.schedule)),
            "convergence_loss": float(self.convergence_loss),
            "stop_at": self.stop_at,
        }

    @classmethod
    def from_dict(cls, config: dict) -> "FlowParams":
        """Inverse of ``to_dict``; a named schedule cannot be restored and raises ValueError."""
        config = dict(config)
        if config.pop("schedule", None) is not None:
            raise ValueError("schedule: a config with a schedule function cannot be rebuilt from JSON")
        task = ChainTask(config["task"]["n"], config["task"]["start_probs"])
        return cls(
            task=task,
            model=ModelSpec(**config.pop("model")),
            theta0=Theta.from_array(config.pop("theta0")),
            **{k: v for k, v in config.items() if k != "task"},
        )


def level_event(params: FlowParams, level) -> diffrax.Event:
    """A terminating event at J(theta) = level on ``task``, root-found by bisection within the step."""
    cond = lambda t, y, args, **kw: expected_reward(Theta.from_array(y), params.task, params.model) - level
    return diffrax.Event(cond, root_finder=optx.Bisection(rtol=1e-14, atol=1e-12, flip=False))


def _stop_event(params: FlowParams) -> diffrax.Event | None:
    """The event ``stop_at`` asks for, or None."""
    if params.stop_at is None:
        return None
    return level_event(params, params.event_level(params.stop_at))


def integrate(params: FlowParams, saveat: diffrax.SaveAt, *, t0=None, t1=None, y0=None, max_steps=None,
              event=None, progress: bool = False) -> diffrax.Solution:
    """diffeqsolve of d theta/dt = grad J with the config's solver and tolerances (defaults: its span,
    theta0 and max_steps); never throws, the caller reads ``result``."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(params.vector_field),
        SOLVERS[params.solver](),
        params.t0 if t0 is None else t0,
        params.t1 if t1 is None else t1,
        None,
        params.theta0.as_array() if y0 is None else y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=params.rtol, atol=params.atol),
        event=event,
        max_steps=params.max_steps if max_steps is None else max_steps,
        throw=False,
        progress_meter=diffrax.TqdmProgressMeter(refresh_steps=200) if progress else diffrax.NoProgressMeter(),
    )


def metrics_at(params: FlowParams, theta: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Closed-form read-outs at one theta (5,): reward, per-position forward/switch, length, traversal."""
    th = Theta.from_array(theta)
    steps = step_probabilities(th, params.task.n, params.model)
    return {
        "reward": expected_reward(th, params.task, params.model),
        "forward_prob": steps.forward_given_move,
        "switch_prob": steps.switch / (1.0 - steps.self),
        "expected_length": expected_length(th, params.task, params.model),
        "traversal_prob": traversal_probability(th, params.task, params.model),
    }


def _hit_time(params: FlowParams, ts, thetas, rewards, level, max_steps: int = LOCAL_MAX_STEPS):
    """First t with J(t) = level: bracket on the saves, re-solve densely inside it, bisect.

    Returns (time, resolved): time is NaN if the level is never reached; resolved is False when the
    bracket's dense re-solve needed more than ``max_steps`` steps (the time is then meaningless).
    """
    reached = rewards >= level
    k = jnp.argmax(reached)
    k_lo = jnp.maximum(k - 1, 0)
    t_lo, t_hi = ts[k_lo], ts[k]
    t_end = jnp.where(t_hi > t_lo, t_hi, t_lo + 1.0)
    solution = integrate(params, diffrax.SaveAt(dense=True), t0=t_lo, t1=t_end, y0=thetas[k_lo], max_steps=max_steps)
    reward_at = lambda t: expected_reward(Theta.from_array(solution.evaluate(t)), params.task, params.model)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = reward_at(mid) < level
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    _, t_hit = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (t_lo, t_hi))
    t_hit = jnp.where(k == 0, ts[0], t_hit)
    resolved = (solution.result == diffrax.RESULTS.successful) | (k == 0) | ~jnp.any(reached)
    return jnp.where(jnp.any(reached), t_hit, jnp.nan), resolved


def _solve(params: FlowParams, progress: bool) -> dict[str, jnp.ndarray]:
    """Integrate the flow, read the closed-form metrics at the saves and locate the events."""
    ts = params.times()
    solution = integrate(params, diffrax.SaveAt(ts=ts, t1=True), event=_stop_event(params), progress=progress)
    # after a requested stop diffrax writes the stop state into the next save slot (with its time)
    # and inf into the rest: keep the real times, NaN the unused slots
    saved_ts, saved_ys = solution.ts[:-1], solution.ys[:-1]
    valid = jnp.isfinite(saved_ts) & jnp.all(jnp.isfinite(saved_ys), axis=1)
    ts = jnp.where(valid, saved_ts, jnp.nan)
    thetas = jnp.where(valid[:, None], saved_ys, jnp.nan)
    # lax.map in chunks of ~4096 / n saves bounds the intermediates of large n (a full vmap over the
    # saves of a 64-config sweep at n = 1000 peaks at 4.4 GB); small n stays one vmapped chunk
    chunk = max(1, min(thetas.shape[0], METRIC_CHUNK_ELEMENTS // params.task.n))
    metrics = jax.lax.map(lambda y: metrics_at(params, y), jnp.nan_to_num(thetas), batch_size=chunk)
    metrics = {k: jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.nan) for k, v in metrics.items()}
    safe_rewards = jnp.where(valid, metrics["reward"], -jnp.inf)
    t_stop = jnp.max(jnp.where(jnp.isfinite(solution.ts), solution.ts, -jnp.inf))
    stopped = t_stop < params.t1

    def hit(event: str) -> dict[str, jnp.ndarray]:
        """t_<event> (the stop time when the solve stopped at this event) and whether it is resolved."""
        t, resolved = _hit_time(
            params, jnp.nan_to_num(ts), jnp.nan_to_num(thetas), safe_rewards, params.event_level(event), BRACKET_MAX_STEPS
        )
        by_event = stopped & (params.stop_at == event)
        return {f"t_{event}": jnp.where(by_event, t_stop, t), f"{event}_resolved": by_event | resolved}

    return {
        "ts": ts,
        "theta": thetas,
        **metrics,
        **hit("threshold"),
        **hit("converged"),
        "t_stop": t_stop,
        "success": (solution.result == diffrax.RESULTS.successful) | (solution.result == diffrax.RESULTS.event_occurred),
        "num_steps": solution.stats["num_steps"],
        "num_accepted_steps": solution.stats["num_accepted_steps"],
        "num_rejected_steps": solution.stats["num_rejected_steps"],
    }


_COMPILED: dict = {}


def compilation_count() -> int:
    """How many flow executables have been compiled in this process (one per structure and batch)."""
    return len(_COMPILED)


def _compiled(params: FlowParams, batched: bool, progress: bool, n_devices: int = 1):
    """The compiled solve for this structure (cached by treedef, shapes and devices), and its compile time."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves), batched, progress, n_devices)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    fn = lambda p: _solve(p, progress)
    fn = jax.vmap(fn) if batched else fn
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params).compile()
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - start


@dataclass
class Trajectory:
    """A solved flow: arrays over the save times, events, solver statistics and the config.

    ts (T,), theta (T, 5) in (alpha, beta, gamma, eta, delta) order, reward (T,), forward_prob (T, n-1)
    = P(forward | the walk moves) at each position of chain a, switch_prob (T, n-1) = P(jump to the
    other chain | moves), expected_length (T,), traversal_prob (T,).  events maps "reward_threshold"
    and "converged" to a time or None.  Times after a requested stop are NaN.
    """

    config: FlowParams
    ts: np.ndarray
    theta: np.ndarray
    reward: np.ndarray
    forward_prob: np.ndarray
    switch_prob: np.ndarray
    expected_length: np.ndarray
    traversal_prob: np.ndarray
    events: dict[str, float | None]
    stats: dict[str, float] = field(default_factory=dict)

    ARRAYS = ("ts", "theta", "reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob")

    @property
    def loss(self) -> np.ndarray:
        """1 - J along the trajectory."""
        return 1.0 - self.reward

    @property
    def minimal_length(self) -> float:
        """The expected length of exact forward traversal: sum_d p[d-1] d."""
        return float(np.asarray(self.config.task.start_probs) @ np.arange(1, self.config.task.n))

    def t_hit(self, level: float) -> float | None:
        """First time the reward reaches ``level`` (root-found on a dense re-solve), None if never."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        rewards = np.where(np.isfinite(self.reward), self.reward, -np.inf)
        thetas = np.nan_to_num(self.theta)
        ts = jnp.asarray(np.nan_to_num(self.ts))
        t, resolved = _hit_time_jit(self.config, ts, jnp.asarray(thetas), jnp.asarray(rewards), level)
        if not resolved:
            raise RuntimeError(f"t_hit({level}): the bracket needs over {LOCAL_MAX_STEPS} steps; save more times (save_ts)")
        return None if np.isnan(t) else float(t)

    def save(self, path: str | Path) -> Path:
        """Write ``path``.npz (arrays) and ``path``.json (config, events, stats, versions)."""
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".npz"), **{k: getattr(self, k) for k in self.ARRAYS})
        meta = {
            "config": self.config.to_dict(),
            "events": self.events,
            "stats": self.stats,
            "versions": _versions(),
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        """Read a trajectory written by ``save`` (config rebuilt from the JSON sidecar)."""
        path = Path(path).with_suffix("")
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz")) as data:
            arrays = {k: data[k] for k in cls.ARRAYS}
        return cls(config=FlowParams.from_dict(meta["config"]), events=meta["events"], stats=meta["stats"], **arrays)


_hit_time_jit = jax.jit(_hit_time)


def _versions() -> dict[str, str]:
    import gradflow

    return {"gradflow": gradflow.__version__, "jax": jax.__version__, "diffrax": diffrax.__version__}


def _trajectory(params: FlowParams, out: dict, stats: dict) -> Trajectory:
    """Package one config's solve output, raising if the solver stopped before t1 unasked."""
    if not bool(out["success"]):
        raise RuntimeError(
            f"the flow solve stopped early at t={float(out['t_stop']):.6g} < t1={float(params.t1):.6g} "
            f"after {int(out['num_steps'])} steps: raise max_steps (now {params.max_steps}) or loosen rtol/atol"
        )
    as_time = lambda t: None if np.isnan(t) else float(t)
    trajectory = Trajectory(
        config=params,
        events={"reward_threshold": as_time(out["t_threshold"]), "converged": as_time(out["t_converged"])},
        stats={
            **stats,
            "num_steps": int(out["num_steps"]),
            "num_accepted_steps": int(out["num_accepted_steps"]),
            "num_rejected_steps": int(out["num_rejected_steps"]),
        },
        **{k: np.asarray(out[k]) for k in Trajectory.ARRAYS},
    )
    for name, event in (("reward_threshold", "threshold"), ("converged", "converged")):
        if not bool(out[f"{event}_resolved"]):  # the in-solve bracket ran out of steps: redo it with a larger buffer
            trajectory.events[name] = trajectory.t_hit(float(params.event_level(event)))
    return trajectory


def simulate(flow_params: FlowParams, progress: bool = True) -> Trajectory:
    """Integrate d theta/dt = grad J(theta) from theta0 over [t0, t1]; see ``Trajectory``."""
    compiled, compile_s = _compiled(flow_params, batched=False, progress=progress)
    start = time.perf_counter()
    out = jax.device_get(compiled(flow_params))
    stats = {"compile_seconds": compile_s, "run_seconds": time.perf_counter() - start}
    return _trajectory(flow_params, out, stats)


def stack_configs(configs: Sequence[FlowParams]) -> FlowParams:
    """Stack configs of one structure on a leading axis; ValueError names what differs."""
    if not configs:
        raise ValueError("configs must hold at least one FlowParams")
    structure = jax.tree_util.tree_structure(configs[0])
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(configs[0])]
    for index, cfg in enumerate(configs):
        if jax.tree_util.tree_structure(cfg) != structure or [np.shape(x) for x in jax.tree_util.tree_leaves(cfg)] != shapes:
            raise ValueError(
                f"configs[{index}] differs in structure from configs[0] (n, attention kind, solver, coords, "
                "n_vocab, max_steps, schedule, stop_at and save_ts length must match): run it separately"
            )
    # stacked on the host, then one transfer per leaf (jnp.stack of 64 device scalars is ~1.5x slower)
    return jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *configs)


def simulate_many(configs: Sequence[FlowParams], progress: bool = False, devices=None) -> list[Trajectory]:
    """Solve configs of one structure as one vmapped compilation; results match ``simulate``.

    devices: None (default device) or a sequence of jax devices (``jax.devices()`` for all): the batch
    is padded to a multiple of the device count and sharded along a 1-D mesh.
    """
    batch = stack_configs(configs)
    size = len(configs)
    n_devices = 1 if devices is None else len(devices)
    if devices is not None:
        batch = _shard(batch, size, list(devices))
    compiled, compile_s = _compiled(batch, batched=True, progress=progress, n_devices=n_devices)
    start = time.perf_counter()
    out = jax.device_get(compiled(batch))
    stats = {"compile_seconds": compile_s, "run_seconds": time.perf_counter() - start, "batch": size}
    return [_trajectory(cfg, {k: v[i] for k, v in out.items()}, stats) for i, cfg in enumerate(configs)]


def _shard(batch: FlowParams, size: int, devices: list) -> FlowParams:
    """Pad the leading axis to a multiple of len(devices) (repeating the last config) and shard it."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    padded = -(-size // len(devices)) * len(devices)
    pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], padded - size, axis=0)]) if padded > size else x
    batch = jax.tree_util.tree_map(pad, batch)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)
