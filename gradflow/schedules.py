"""Curricula as data: schedule families t -> start_probs whose numbers are traced arrays.

A plain Python callable as ``FlowParams.schedule`` is static: every curriculum recompiles, two of
them cannot share a batch and its JSON record is only a name.  The families here are equinox
modules whose fields are arrays, so two schedules of one family and shape share one compilation
(and stack and vmap like any pytree), and ``to_dict``/``from_dict`` round-trip them through JSON.

Families (each ``__call__(t) -> start_probs`` of shape (n-1,), entry d-1 = P(start distance d)):

- ``Constant(probs)``: one distribution at all times.
- ``Step(switch_time, before, after)``: ``before`` for t < switch_time, ``after`` from then on.
- ``PiecewiseConstant(boundaries, probs)``: K pieces, probs[k] on [boundaries[k-1], boundaries[k])
  (piece 0 from t = 0, piece K-1 to infinity); the K-1 boundaries are times, usually log-spaced.
- ``PiecewiseLinear(knots, probs)``: K knots; between knots the distribution is interpolated
  linearly in log t, before the first knot it is probs[0], after the last probs[K-1].

Every value is a convex combination of the stored distributions, so it lies exactly on the simplex.
Distributions are stored as probabilities (JSON keeps them exactly); ``from_logits`` maps
unconstrained logits through a softmax, which is how ``gradflow.design`` optimises them.
``schedule_from_spec`` parses the command-line form (see its docstring) or a JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import as_float_array, check_distribution, check_int, is_concrete

KINDS = ("constant", "step", "piecewise_constant", "piecewise_linear")


def _check_rows(name: str, probs, tol: float = 1e-9) -> None:
    """Every row (last axis) of ``probs`` must be a distribution over d = 1..n-1 (n >= 2)."""
    shape = np.shape(probs)
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"{name} must hold distributions over d = 1..n-1 on its last axis, got shape {shape}")
    if not is_concrete(probs):
        return
    arr = np.asarray(probs, dtype=float).reshape(-1, shape[-1])
    for k, row in enumerate(arr):
        check_distribution(name if arr.shape[0] == 1 else f"{name}[{k}]", row, shape[-1], tol)


def _check_times(name: str, times, count: int, why: str) -> None:
    """``times`` must be a 1-D array of ``count`` finite times > 0, strictly increasing."""
    shape = np.shape(times)
    if shape != (count,):
        raise ValueError(f"{name} must hold {count} times ({why}), got shape {shape}")
    if not is_concrete(times):
        return
    arr = np.asarray(times, dtype=float)
    if np.any(~np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite times > 0, got {arr.tolist()}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"{name} must be strictly increasing, got {arr.tolist()}")


def _tolist(x):
    return np.asarray(x, dtype=float).tolist()


def _t_log_t_minus_t(t):
    """F(t) = t log t - t (antiderivative of log t), with F(0) = 0."""
    safe = jnp.maximum(t, 1e-300)
    return jnp.where(t > 0, safe * jnp.log(safe) - safe, 0.0)


class Schedule(eqx.Module):
    """Base class of the schedule families: ``__call__(t) -> start_probs (n-1,)``."""

    #: the fields that hold distributions over d on their last axis (``map_distributions`` acts on them)
    DISTRIBUTION_FIELDS = ()

    @property
    def n(self) -> int:
        """The chain length n (distributions have n-1 entries)."""
        return int(np.shape(getattr(self, self.DISTRIBUTION_FIELDS[0]))[-1]) + 1

    def __call__(self, t) -> jnp.ndarray:
        raise NotImplementedError

    def jump_times(self) -> jnp.ndarray | None:
        """Times where the schedule jumps (the flow's step controller stops there), or None."""
        return None

    def mean_probs(self, t0, t1) -> jnp.ndarray:
        """The time-averaged distribution (1/(t1-t0)) int_{t0}^{t1} schedule(t) dt (exact).

        Args:
            t0 (float | jax.Array): the start of the window.
            t1 (float | jax.Array): its end, > t0.

        Returns:
            The mean start distribution, shape (n-1,).
        """
        raise NotImplementedError

    def map_distributions(self, fn) -> Schedule:
        """The same schedule with ``fn`` applied to every stored distribution (arrays (..., n-1))."""
        where = lambda s: tuple(getattr(s, name) for name in self.DISTRIBUTION_FIELDS)
        return eqx.tree_at(where, self, tuple(fn(getattr(self, name)) for name in self.DISTRIBUTION_FIELDS))

    def to_dict(self) -> dict:
        """A JSON-ready record: "kind" (the family) and the family's fields as lists (``from_dict`` reads it back)."""
        raise NotImplementedError


class Constant(Schedule):
    """One start distribution at all times (a fixed mixture, as a schedule)."""

    probs: jnp.ndarray = eqx.field(converter=as_float_array)
    DISTRIBUTION_FIELDS = ("probs",)

    def __check_init__(self):
        if np.ndim(self.probs) != 1:
            raise ValueError(f"probs must be 1-D (n-1,), got shape {np.shape(self.probs)}")
        _check_rows("probs", self.probs)

    def __call__(self, t) -> jnp.ndarray:
        return self.probs

    def mean_probs(self, t0, t1) -> jnp.ndarray:
        """The time-averaged distribution over [t0, t1]: ``probs`` itself.

        Args:
            t0 (float | jax.Array): the start of the window.
            t1 (float | jax.Array): its end, > t0.

        Returns:
            ``probs``, shape (n-1,).
        """
        return self.probs

    def to_dict(self) -> dict:
        """The record {"kind": "constant", "probs": [...]}."""
        return {"kind": "constant", "probs": _tolist(self.probs)}


class Step(Schedule):
    """``before`` for t < switch_time, ``after`` for t >= switch_time."""

    switch_time: jnp.ndarray = eqx.field(converter=as_float_array)
    before: jnp.ndarray = eqx.field(converter=as_float_array)
    after: jnp.ndarray = eqx.field(converter=as_float_array)
    DISTRIBUTION_FIELDS = ("before", "after")

    def __check_init__(self):
        if np.shape(self.switch_time) != ():
            raise ValueError(f"switch_time must be a scalar, got shape {np.shape(self.switch_time)}")
        if is_concrete(self.switch_time) and not (np.isfinite(float(self.switch_time)) and float(self.switch_time) >= 0):
            raise ValueError(f"switch_time must be a finite time >= 0, got {float(self.switch_time)}")
        if np.ndim(self.before) != 1 or np.shape(self.after) != np.shape(self.before):
            raise ValueError(
                f"before and after must be 1-D of one shape (n-1,), got {np.shape(self.before)} and {np.shape(self.after)}"
            )
        _check_rows("before", self.before)
        _check_rows("after", self.after)

    def __call__(self, t) -> jnp.ndarray:
        return jnp.where(t < self.switch_time, self.before, self.after)

    def jump_times(self) -> jnp.ndarray:
        """The one jump: ``switch_time`` as an array of shape (1,)."""
        return self.switch_time[None]

    def mean_probs(self, t0, t1) -> jnp.ndarray:
        """The time-averaged distribution over [t0, t1]: ``before`` and ``after`` weighed by their time shares.

        Args:
            t0 (float | jax.Array): the start of the window.
            t1 (float | jax.Array): its end, > t0.

        Returns:
            The mean start distribution, shape (n-1,).
        """
        span = t1 - t0
        early = jnp.clip(self.switch_time - t0, 0.0, span) / span
        return early * self.before + (1.0 - early) * self.after

    def to_dict(self) -> dict:
        """The record {"kind": "step", "switch_time": ..., "before": [...], "after": [...]}."""
        return {
            "kind": "step",
            "switch_time": float(self.switch_time),
            "before": _tolist(self.before),
            "after": _tolist(self.after),
        }


class PiecewiseConstant(Schedule):
    """K pieces: probs[k] on [boundaries[k-1], boundaries[k]), piece 0 from t = 0, piece K-1 onwards."""

    boundaries: jnp.ndarray = eqx.field(converter=as_float_array)
    probs: jnp.ndarray = eqx.field(converter=as_float_array)
    DISTRIBUTION_FIELDS = ("probs",)

    def __check_init__(self):
        if np.ndim(self.probs) != 2 or np.shape(self.probs)[0] < 1:
            raise ValueError(f"probs must have shape (K, n-1) with K >= 1 pieces, got {np.shape(self.probs)}")
        _check_times("boundaries", self.boundaries, np.shape(self.probs)[0] - 1, "one fewer than the pieces of probs")
        _check_rows("probs", self.probs)

    def __call__(self, t) -> jnp.ndarray:
        piece = jnp.sum(t >= self.boundaries)
        return self.probs[piece]

    def jump_times(self) -> jnp.ndarray | None:
        """The piece boundaries, or None for a single piece."""
        return self.boundaries if self.boundaries.shape[0] else None

    def mean_probs(self, t0, t1) -> jnp.ndarray:
        """The time-averaged distribution over [t0, t1]: the pieces weighed by their time shares.

        Args:
            t0 (float | jax.Array): the start of the window.
            t1 (float | jax.Array): its end, > t0.

        Returns:
            The mean start distribution, shape (n-1,).
        """
        edges = jnp.concatenate([jnp.atleast_1d(t0), jnp.clip(self.boundaries, t0, t1), jnp.atleast_1d(t1)])
        weights = jnp.diff(edges) / (t1 - t0)
        return weights @ self.probs

    def to_dict(self) -> dict:
        """The record {"kind": "piecewise_constant", "boundaries": [...], "probs": [[...], ...]}."""
        return {"kind": "piecewise_constant", "boundaries": _tolist(self.boundaries), "probs": _tolist(self.probs)}


class PiecewiseLinear(Schedule):
    """K knots; linear interpolation of the distributions in log t, constant outside the knots."""

    knots: jnp.ndarray = eqx.field(converter=as_float_array)
    probs: jnp.ndarray = eqx.field(converter=as_float_array)
    DISTRIBUTION_FIELDS = ("probs",)

    def __check_init__(self):
        if np.ndim(self.probs) != 2 or np.shape(self.probs)[0] < 1:
            raise ValueError(f"probs must have shape (K, n-1) with K >= 1 knots, got {np.shape(self.probs)}")
        _check_times("knots", self.knots, np.shape(self.probs)[0], "one per row of probs")
        _check_rows("probs", self.probs)

    def _weights(self, t) -> jnp.ndarray:
        """Interpolation weights over the K knots at time t (they sum to 1, all >= 0)."""
        log_knots = jnp.log(self.knots)
        s = jnp.log(jnp.maximum(t, 1e-300))
        s = jnp.clip(s, log_knots[0], log_knots[-1])
        if self.knots.shape[0] == 1:
            return jnp.ones(1)
        k = jnp.clip(jnp.searchsorted(log_knots, s, side="right") - 1, 0, self.knots.shape[0] - 2)
        frac = (s - log_knots[k]) / (log_knots[k + 1] - log_knots[k])
        return jnp.zeros(self.knots.shape[0]).at[k].add(1.0 - frac).at[k + 1].add(frac)

    def __call__(self, t) -> jnp.ndarray:
        return self._weights(t) @ self.probs

    def mean_probs(self, t0, t1) -> jnp.ndarray:
        """The time-averaged distribution over [t0, t1], exact.

        Each segment contributes (q_k dt + slope_k int (log t - log t_k) dt), clipped to [t0, t1].

        Args:
            t0 (float | jax.Array): the start of the window.
            t1 (float | jax.Array): its end, > t0.

        Returns:
            The mean start distribution, shape (n-1,).
        """
        knots, probs = self.knots, self.probs
        span = t1 - t0
        head = jnp.clip(knots[0], t0, t1) - t0
        tail = t1 - jnp.clip(knots[-1], t0, t1)
        total = head * probs[0] + tail * probs[-1]
        if knots.shape[0] > 1:
            lo, hi = jnp.clip(knots[:-1], t0, t1), jnp.clip(knots[1:], t0, t1)
            log_lo = jnp.log(knots[:-1])
            slope = (probs[1:] - probs[:-1]) / (jnp.log(knots[1:]) - log_lo)[:, None]
            integral_log = _t_log_t_minus_t(hi) - _t_log_t_minus_t(lo) - (hi - lo) * log_lo  # int (log t - log t_k)
            total = total + jnp.sum((hi - lo)[:, None] * probs[:-1] + integral_log[:, None] * slope, axis=0)
        return total / span

    def to_dict(self) -> dict:
        """The record {"kind": "piecewise_linear", "knots": [...], "probs": [[...], ...]}."""
        return {"kind": "piecewise_linear", "knots": _tolist(self.knots), "probs": _tolist(self.probs)}


FAMILIES = {"constant": Constant, "step": Step, "piecewise_constant": PiecewiseConstant, "piecewise_linear": PiecewiseLinear}


def is_schedule(obj) -> bool:
    """True for the schedule modules of this file (traced data), False for plain callables."""
    return isinstance(obj, Schedule)


def from_dict(config: dict) -> Schedule:
    """Inverse of ``Schedule.to_dict``: the "kind" key picks the family, the rest are its fields."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"kind: a schedule record needs a 'kind' key (one of {list(KINDS)}), got {config!r}")
    config = dict(config)
    kind = config.pop("kind")
    if kind not in FAMILIES:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    family = FAMILIES[kind]
    expected = {name for name in family.__dataclass_fields__ if name != "DISTRIBUTION_FIELDS"}
    unknown, missing = set(config) - expected, expected - set(config)
    if unknown or missing:
        raise ValueError(
            f"{kind} schedule: fields must be {sorted(expected)}, unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    return family(**config)


def from_logits(kind: str, logits, **times) -> Schedule:
    """A schedule whose distributions are softmax(logits) (last axis): the simplex holds exactly.

    Args:
        kind: "constant", "step", "piecewise_constant" or "piecewise_linear".
        logits (ArrayLike): (n-1,) for constant; (2, n-1) for step (before, after); (K, n-1) for the
            piecewise families.
        **times (ArrayLike): the family's times: switch_time= (step), boundaries= (piecewise_constant)
            or knots= (piecewise_linear); none for constant.

    Returns:
        The ``Schedule``.

    Raises:
        ValueError: an unknown kind, or logits / times of the wrong shape (the family's checks).
    """
    probs = jax.nn.softmax(jnp.asarray(logits, dtype=float), axis=-1)
    if kind == "constant":
        return Constant(probs)
    if kind == "step":
        return Step(times["switch_time"], probs[0], probs[1])
    if kind == "piecewise_constant":
        return PiecewiseConstant(times["boundaries"], probs)
    if kind == "piecewise_linear":
        return PiecewiseLinear(times["knots"], probs)
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def log_knots(t_budget: float, count: int, t_first: float | None = None) -> np.ndarray:
    """``count`` log-spaced times from ``t_first`` (default t_budget / 1000) to ``t_budget``.

    Args:
        t_budget: the last time, > 0.
        count: the number of times, >= 1 (one: just t_budget).
        t_first: the first time (default t_budget / 1000).

    Returns:
        The times, shape (count,).

    Raises:
        ValueError: count < 1 or t_budget <= 0.
    """
    check_int("count", count, 1)
    if not float(t_budget) > 0:
        raise ValueError(f"t_budget must be > 0, got {t_budget!r}")
    t_first = float(t_budget) * 1e-3 if t_first is None else float(t_first)
    if count == 1:
        return np.array([float(t_budget)])
    return np.geomspace(t_first, float(t_budget), count)


# --------------------------------------------------------------------------------------------------
# The command-line form
# --------------------------------------------------------------------------------------------------


def named_distribution(text: str, n: int) -> np.ndarray:
    """A distribution over d = 1..n-1 from its name.

    ``uniform``; ``hardest`` (d = n-1); ``easiest`` (d = 1); ``d<k>`` (all mass on distance k);
    ``k_hardest:<k>`` (uniform over the k largest distances); ``mix<c>`` (mass c on d = 1, the rest
    on the hardest); or explicit probabilities separated by '/' (n-1 numbers summing to 1, e.g.
    ``0.1/0/0/0/0/0/0.9`` at n = 8).

    Args:
        text: the name (or the '/'-separated probabilities).
        n: the chain length, >= 2.

    Returns:
        The probabilities, shape (n-1,).

    Raises:
        ValueError: an unknown name, a distance or k out of range, or probabilities that are not n-1
            non-negative numbers summing to 1.
    """
    check_int("n", n, 2)
    text = text.strip()
    probs = np.zeros(n - 1)
    if text == "uniform":
        return np.full(n - 1, 1.0 / (n - 1))
    if text == "hardest":
        probs[-1] = 1.0
        return probs
    if text == "easiest":
        probs[0] = 1.0
        return probs
    try:
        if text.startswith("d") and text[1:].isdigit():
            d = int(text[1:])
            if not 1 <= d <= n - 1:
                raise ValueError(f"distribution {text!r}: d must lie in 1..{n - 1}")
            probs[d - 1] = 1.0
            return probs
        if text.startswith("k_hardest:"):
            k = int(text.removeprefix("k_hardest:"))
            if not 1 <= k <= n - 1:
                raise ValueError(f"distribution {text!r}: k must lie in 1..{n - 1}")
            probs[n - 1 - k :] = 1.0 / k
            return probs
        if text.startswith("mix"):
            c = float(text[3:])
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"distribution {text!r}: the mass c must lie in [0, 1]")
            probs[0] += c
            probs[-1] += 1.0 - c
            return probs
        values = np.array([float(x) for x in text.split("/")])
    except ValueError as error:
        if "distribution" in str(error):
            raise
        raise ValueError(
            f"distribution {text!r}: expected uniform, hardest, easiest, d<k>, k_hardest:<k>, mix<c> "
            f"or {n - 1} numbers separated by '/'"
        ) from None
    check_distribution(f"distribution {text!r}", values, n - 1, tol=1e-6)
    return values / values.sum()


def _split_fields(body: str, spec: str) -> dict[str, str]:
    fields = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ValueError(f"schedule {spec!r}: expected key=value pairs separated by ',', got {part!r}")
        key, value = (x.strip() for x in part.split("=", 1))
        if key in fields:
            raise ValueError(f"schedule {spec!r}: the key {key!r} is given twice")
        fields[key] = value
    return fields


def _times(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split("|")]
    except ValueError:
        raise ValueError(f"{name}: expected times separated by '|', got {text!r}") from None


def schedule_from_spec(text: str, n: int) -> Schedule:
    """Parse a schedule given on the command line, as text or as a JSON file.

    Forms (distributions as in ``named_distribution``; pieces and knots separated by '|'):

    - ``constant:probs=mix0.1`` (or ``constant:mix0.1``)
    - ``step:t=2.5,before=easiest,after=hardest``
    - ``pwc:boundaries=1|10,probs=easiest|uniform|hardest`` (piecewise constant, K pieces)
    - ``pwl:knots=0.1|1|10,probs=easiest|uniform|hardest`` (piecewise linear in log t, K knots)
    - a path to a JSON file holding ``Schedule.to_dict()``, or that JSON text itself ('{...}').

    Args:
        text (str | Path): the spec, a JSON file path or JSON text.
        n: the chain length, >= 2 (the distributions are over d = 1..n-1).

    Returns:
        The ``Schedule``.

    Raises:
        ValueError: the spec cannot be parsed or describes an invalid schedule; the message says which part.
    """
    check_int("n", n, 2)
    if not isinstance(text, (str, Path)):
        raise ValueError(f"schedule: expected a spec string or a JSON file path, got {text!r}")
    text = str(text).strip()
    if text.startswith("{") or text.endswith(".json"):
        try:
            record = json.loads(text if text.startswith("{") else Path(text).read_text())
        except OSError as error:
            raise ValueError(f"schedule: cannot read {text!r} ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"schedule: invalid JSON ({error})") from None
        schedule = from_dict(record)
        if schedule.n != n:
            raise ValueError(f"schedule: its distributions are over {schedule.n - 1} distances, expected n-1 = {n - 1}")
        return schedule
    kind, _, body = text.partition(":")
    kind = {"pwc": "piecewise_constant", "pwl": "piecewise_linear"}.get(kind.strip(), kind.strip())
    if kind not in FAMILIES:
        raise ValueError(f"schedule {text!r}: kind must be one of constant, step, pwc, pwl (or a .json file)")
    if kind == "constant" and "=" not in body:
        body = f"probs={body}"
    fields = _split_fields(body, text)
    allowed = {
        "constant": {"probs"},
        "step": {"t", "before", "after"},
        "piecewise_constant": {"boundaries", "probs"},
        "piecewise_linear": {"knots", "probs"},
    }[kind]
    if set(fields) != allowed:
        raise ValueError(f"schedule {text!r}: {kind} needs exactly the keys {sorted(allowed)}, got {sorted(fields)}")
    if kind == "constant":
        return Constant(named_distribution(fields["probs"], n))
    if kind == "step":
        try:
            switch = float(fields["t"])
        except ValueError:
            raise ValueError(f"t: the switch time must be a number, got {fields['t']!r}") from None
        return Step(switch, named_distribution(fields["before"], n), named_distribution(fields["after"], n))
    probs = np.stack([named_distribution(p, n) for p in fields["probs"].split("|")])
    if kind == "piecewise_constant":
        return PiecewiseConstant(_times(fields["boundaries"], "boundaries"), probs)
    return PiecewiseLinear(_times(fields["knots"], "knots"), probs)
