"""Every deprecated name of gradflow, in one place.  Each keeps working and warns once per process.

A deprecated name is one row of ``ALIASES``: where it was (``module:name``, ``Class.attribute`` or
``function(keyword=)``), what replaces it, and how it resolves.  Modules read their rows through
``module_getattr`` (a PEP 562 ``__getattr__``), classes through ``renamed_property``, functions
through ``renamed_keyword`` and command-line flags through ``deprecated_flag``; nothing else in
gradflow spells an old name.
"""

from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple


class Alias(NamedTuple):
    """An old name, its replacement (as users should now write it) and the target it resolves to."""

    old: str
    new: str
    target: str  # "module:attribute" for a module alias (a trailing "()" calls it), else the replacement's name


ALIASES: tuple[Alias, ...] = (
    Alias("gradflow.theory:DEFAULT_THETA0", "gradflow.model.default_theta0()", "gradflow.model:default_theta0()"),
    Alias("gradflow.training:PARAM_KINDS", "gradflow.training.COORDS", "gradflow.training:COORDS"),
    Alias("gradflow.training.train(params=)", "gradflow.training.train(coords=)", "coords"),
    *(
        Alias(f"gradflow.sampling:{name}", f"gradflow.training.{new}", f"gradflow.training:{new}")
        for name, new in (
            ("train", "train"),
            ("gradient_descent", "gradient_descent"),
            ("TrainingTrajectory", "TrainingTrajectory"),
            ("TrainConfig", "TrainConfig"),
            ("OPTIMIZERS", "OPTIMIZERS"),
            ("PARAM_KINDS", "COORDS"),
        )
    ),
    Alias("StepProbabilities.self", "StepProbabilities.stay", "stay"),
    Alias("gradflow design --mean-easy-mass", "gradflow design --max-mean-easy-mass", "--max-mean-easy-mass"),
    Alias(
        INT_TASK := "an int n in place of the task (step_probabilities, transition_matrix, gradient_by_distance)",
        "a ChainTask (e.g. gradflow.ChainTask.uniform(n))",
        "task",
    ),
)

_WARNED: set[str] = set()


def warn_once(old: str, new: str) -> None:
    """One DeprecationWarning per old name per process: "``old`` is deprecated; use ``new``".

    Args:
        old: the deprecated name (the key of the once-only record).
        new: what to use instead.
    """
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _by_old(old: str) -> Alias:
    return next(alias for alias in ALIASES if alias.old == old)


def _resolve(target: str):
    module, _, attribute = target.partition(":")
    call = attribute.endswith("()")
    value = getattr(importlib.import_module(module), attribute.removesuffix("()"))
    return value() if call else value


def module_getattr(module: str):
    """A module ``__getattr__`` serving that module's deprecated names (and AttributeError for others)."""
    names = {alias.old.partition(":")[2]: alias for alias in ALIASES if alias.old.startswith(f"{module}:")}

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        alias = names[name]
        warn_once(alias.old, alias.new)
        return _resolve(alias.target)

    return __getattr__


def deprecated_int_task() -> None:
    """Warn (once) that an int n was passed where a ChainTask is expected."""
    alias = _by_old(INT_TASK)
    warn_once(alias.old, alias.new)


def deprecated_flag(old: str) -> str:
    """The one-line notice the command line prints for its deprecated flag ``old`` (a row of ``ALIASES``)."""
    alias = _by_old(old)
    return f"{alias.old} is deprecated; use {alias.new}"


def renamed_property(old: str) -> property:
    """A read-only property ``Class.old`` returning the attribute it was renamed to (warns once)."""
    alias = _by_old(old)

    def getter(self):
        warn_once(alias.old, alias.new)
        return getattr(self, alias.target)

    return property(getter, doc=f"Deprecated: use {alias.new}.")


def renamed_keyword(old: str, given, current):
    """The value of a renamed keyword: ``current`` unless only the old one (``given``) was passed (warns once).

    Args:
        old: the deprecated keyword's row in ``ALIASES`` (its ``old``).
        given (Any | None): the value passed under the old keyword; None: not passed.
        current (Any | None): the value passed under the new keyword; None: not passed.

    Returns:
        value (Any): ``given`` when it was passed (after the warning), else ``current``.

    Raises:
        ValueError: both keywords are passed and disagree.
    """
    if given is None:
        return current
    alias = _by_old(old)
    warn_once(alias.old, alias.new)
    if current is not None and current != given:
        raise ValueError(f"{alias.old} (deprecated) = {given!r} contradicts {alias.target} = {current!r}")
    return given
