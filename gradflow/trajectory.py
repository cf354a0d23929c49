"""The host-side record of one solved flow (``Trajectory``): arrays over the save times, events,
solver statistics and the config, with an atomic save/load and root-found crossing times (``t_hit``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import readouts
from gradflow._checks import check_choice
from gradflow._version import versions
from gradflow.compile_cache import compiled
from gradflow.config import EVENT_NAMES, RECORDED, FlowParams
from gradflow.integrator import LOCAL_MAX_STEPS, crossing
from gradflow.model import Theta

QUANTITIES = RECORDED + ("eval_reward",)  # what Trajectory.t_hit reads


def quantity_fn(params: FlowParams, quantity: str, index) -> Callable:
    """theta -> the scalar read-out ``quantity`` (per-position ones: entry ``index``, or the min).

    Args:
        params: the config whose task, model and eval tasks are read.
        quantity: a recorded read-out name or "eval_reward" (``QUANTITIES``).
        index (int | str | None): for a per-position read-out, the position (None: the minimum over positions); for
            "eval_reward", the eval task's name.

    Returns:
        A function of a theta array of shape (5,) giving a scalar.

    Raises:
        ValueError: quantity is not one of ``QUANTITIES``, or index names no eval task for "eval_reward".
    """
    check_choice("quantity", quantity, QUANTITIES)
    task = params.task
    if quantity == "eval_reward":
        if index not in params.eval_tasks:
            raise ValueError(
                f"index must name one of eval_tasks {sorted(params.eval_tasks)} for quantity 'eval_reward', got {index!r}"
            )
        task, quantity = params.eval_tasks[index], "reward"
    readout = readouts.READOUTS[quantity]

    def read(y):
        value = readout.fn(Theta.from_array(y), task, params.model)
        if readout.axis is None:
            return value
        return jnp.min(value) if index is None else value[index]

    return read


@dataclass
class Trajectory:
    """A solved flow: arrays over the save times, events, solver statistics and the config.

    ts (T,), theta (T, P) in ``Theta.fields()`` order (alpha, beta, gamma, eta, delta), reward (T,), forward_prob (T, n-1)
    = P(forward | the walk moves) at each position of chain a, switch_prob (T, n-1) = P(jump to the
    other chain | moves), expected_length (T,), traversal_prob (T,).  eval_reward: name -> (T,) reward
    on each of the config's eval_tasks.  events maps "reward_threshold" and "converged" to a time or
    None.  Times after a requested stop are NaN.
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
    eval_reward: dict[str, np.ndarray] = field(default_factory=dict)

    ARRAYS = ("ts", "theta", "reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob")

    @property
    def loss(self) -> np.ndarray:
        """1 - J along the trajectory."""
        return 1.0 - self.reward

    @property
    def minimal_length(self) -> float:
        """The expected length of exact forward traversal: sum_d p[d-1] d."""
        return float(np.asarray(self.config.task.start_probs) @ np.arange(1, self.config.task.n))

    def _values(self, quantity: str, index) -> np.ndarray:
        if quantity == "eval_reward":
            if index not in self.eval_reward:
                raise ValueError(f"index must name one of eval_tasks {sorted(self.eval_reward)}, got {index!r}")
            return np.asarray(self.eval_reward[index], dtype=float)
        values = np.asarray(getattr(self, quantity), dtype=float)
        if values.ndim == 2:
            values = values.min(axis=1) if index is None else values[:, index]
        return values

    def t_hit(self, level: float, quantity: str = "reward", index=None) -> float | None:
        """First (absolute) flow time at which a read-out reaches ``level``, root-found; None if never.

        The crossing goes up when the quantity starts below the level and down otherwise.  It is bracketed
        on the saves, the bracket is re-solved densely and bisected (60 halvings of the bracket), so the
        time is exact to the solver tolerance.  The returned time is absolute (it includes t0).  A reward
        level the solve already located as an event (``reward_threshold``, ``1 - convergence_loss``) is
        read from ``events``, found the same way inside the solve, with no second compilation.

        Args:
            level: the level to reach (in (0, 1) for a probability).
            quantity: "reward" (default), "forward_prob" or "switch_prob", "expected_length",
                "traversal_prob", or "eval_reward".
            index (int | str | None): for "forward_prob" / "switch_prob", the entry (position i - 1; None: the minimum over
                positions); for "eval_reward", the eval task's name.

        Returns:
            The first time the level is reached, or None.

        Raises:
            ValueError: an unknown or unrecorded quantity, a level that is not finite (or not in (0, 1) for a
                probability), or an index that names no eval task.
            RuntimeError: the bracket needs more than ``LOCAL_MAX_STEPS`` steps (save more times).
        """
        check_choice("quantity", quantity, QUANTITIES)
        if not isinstance(level, (int, float, np.floating, np.integer)) or not math.isfinite(float(level)):
            raise ValueError(f"level must be a finite number, got {level!r}")
        if (quantity == "eval_reward" or readouts.READOUTS[quantity].probability) and not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1) for {quantity}, got {level}")
        if quantity != "eval_reward" and quantity not in self.config.recording.readout_names():
            raise ValueError(f"quantity {quantity!r} was not recorded (readouts={self.config.readouts!r})")
        recorded = self._recorded_event(float(level)) if quantity == "reward" else None
        if recorded is not None:
            return self.events[recorded]
        values = self._values(quantity, index)
        if quantity != "eval_reward" and readouts.READOUTS[quantity].axis is not None and index is not None:
            index = int(index)
        thetas = jnp.asarray(np.nan_to_num(self.theta))
        ts = jnp.asarray(np.nan_to_num(self.ts))

        def hit(config, ts, thetas, values, level):
            return crossing(config, ts, thetas, values, level, quantity_fn(config, quantity, index), LOCAL_MAX_STEPS)

        args = (self.config.solver_resolved(), ts, thetas, jnp.asarray(values), jnp.asarray(float(level)))
        executable, _ = compiled("crossing", hit, args, (quantity, index), export=True, quick=True)
        t, reached, resolved = jax.device_get(executable(*args))
        if not bool(resolved):
            raise RuntimeError(
                f"t_hit({level}, {quantity!r}): the bracket needs over {LOCAL_MAX_STEPS} steps; save more times (save_ts)"
            )
        return float(t) if bool(reached) else None

    def _recorded_event(self, level: float) -> str | None:
        """The ``events`` key whose reward level is ``level`` (its time was root-found in the solve), or None."""
        for event, name in EVENT_NAMES.items():
            if name in self.events and level == float(self.config.event_level(event)):
                return name
        return None

    def save(self, path: str | Path) -> Path:
        """Write ``path``.npz (arrays) and then ``path``.json (config, events, stats, versions), each atomically.

        Each file is written to a temporary name in the same folder and renamed into place, the
        JSON last: a present ``.json`` means the pair is complete.
        """
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        npz, sidecar = path.with_suffix(".npz"), path.with_suffix(".json")
        arrays = {k: np.asarray(getattr(self, k)) for k in self.ARRAYS}
        arrays.update({f"eval_reward/{name}": np.asarray(v) for name, v in self.eval_reward.items()})
        arrays.update(self._extra_arrays())
        meta = {
            "config": self.config.to_dict(),
            "events": self.events,
            "stats": self.stats,
            "eval_tasks": sorted(self.eval_reward),
            "versions": versions(),
        }
        if sidecar.exists():  # a rewrite: drop the old marker first, so a crash in between leaves no stale pair
            sidecar.unlink()
        atomic_write(npz, lambda f: np.savez(f, **arrays))
        atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return npz

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory written by ``save``; ValueError naming the field when the files disagree."""
        path = Path(path).with_suffix("")
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.with_suffix('.json')}: not valid JSON ({error})") from None
        for key in ("config", "events", "stats"):
            if key not in meta:
                raise ValueError(f"{path.with_suffix('.json')}: missing key '{key}'")
        try:
            config = FlowParams.from_dict(meta["config"])
        except ValueError as error:
            raise ValueError(f"{path.with_suffix('.json')}: {error}") from None
        eval_names = meta.get("eval_tasks", [])
        npz = path.with_suffix(".npz")
        try:
            with np.load(npz) as data:
                names = set(data.files)
                arrays = {k: data[k] for k in cls.ARRAYS if k in names}
                eval_reward = {name: data[f"eval_reward/{name}"] for name in eval_names if f"eval_reward/{name}" in names}
                extra = cls._extra_fields(data, eval_names)
        except Exception as error:  # noqa: BLE001  (numpy's messages for a foreign or truncated file do not name it)
            raise ValueError(f"{npz}: cannot be read as a gradflow result ({type(error).__name__}: {error})") from None
        missing = [k for k in cls.ARRAYS if k not in arrays] + [f"eval_reward/{n}" for n in eval_names if n not in eval_reward]
        if missing:
            raise ValueError(f"{npz}: missing array(s) {missing}")
        _check_shapes(config, cls._n_saves(config, arrays), arrays, eval_reward, path)
        events = {k: (None if v is None else float(v)) for k, v in meta["events"].items()}
        return cls(config=config, events=events, stats=meta["stats"], eval_reward=eval_reward, **arrays, **extra)

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        """Arrays a subclass saves beyond ``ARRAYS`` and ``eval_reward`` (npz key -> array)."""
        return {}

    @classmethod
    def _extra_fields(cls, data, eval_names) -> dict:
        """The subclass fields read back from the npz ``data`` (the inverse of ``_extra_arrays``)."""
        return {}

    @classmethod
    def _n_saves(cls, config: FlowParams, arrays: dict) -> int:
        """How many records the arrays must hold: the config's number of saves."""
        return config.n_saves()


def _check_shapes(config: FlowParams, saves: int, arrays: dict, eval_reward: dict, path) -> None:
    """Every array must have ``saves`` records and the sidecar config's n."""
    width = config.task.n - 1
    expected = {
        "ts": (saves,),
        "theta": (saves, Theta.size(config.model.values)),
        "reward": (saves,),
        "forward_prob": (saves, width),
        "switch_prob": (saves, width),
        "expected_length": (saves,),
        "traversal_prob": (saves,),
    }
    expected.update({f"eval_reward/{name}": (saves,) for name in eval_reward})
    found = {**arrays, **{f"eval_reward/{k}": v for k, v in eval_reward.items()}}
    for name, shape in expected.items():
        if np.shape(found[name]) != shape:
            raise ValueError(
                f"{path}: array {name} has shape {np.shape(found[name])}, the config implies {shape} "
                f"({saves} saves, n = {config.task.n})"
            )


def atomic_write(path: Path, write: Callable) -> None:
    """``write(f)`` into a temporary file beside ``path`` (flushed to disk), then renamed over ``path``: a reader never
    sees half a file; the temporary file is removed whatever happens, and errors are raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
