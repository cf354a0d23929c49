"""gradflow: exact gradient-flow dynamics of outcome-rewarded chain traversal by one attention layer.

Importing gradflow turns on float64 in JAX (``jax_enable_x64``, a config flag): the closed-form
rewards approach 1 and their gradients become tiny, so every computation runs in double precision.

Importing gradflow builds no arrays and initialises no JAX backend, so ``XLA_FLAGS``,
``JAX_PLATFORMS`` or ``jax.config.update("jax_platforms", ...)`` set after ``import gradflow`` still
take effect.  The public names below are loaded on first use (PEP 562), together with the module that
defines them; ``gradflow.flow``, ``gradflow.theory``, ... load the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

import jax

from gradflow._version import __version__

jax.config.update("jax_enable_x64", True)

# public name -> the module that defines it (loaded on first access)
_EXPORTS = {
    "ChainTask": "gradflow.task",
    "ModelSpec": "gradflow.model",
    "StepProbabilities": "gradflow.model",
    "Theta": "gradflow.model",
    "step_probabilities": "gradflow.model",
    "transition_matrix": "gradflow.model",
    "expected_length": "gradflow.objective",
    "expected_reward": "gradflow.objective",
    "expected_loss": "gradflow.objective",
    "length_per_start": "gradflow.objective",
    "same_side_probability": "gradflow.objective",
    "traversal_per_start": "gradflow.objective",
    "traversal_probability": "gradflow.objective",
    "default_theta0": "gradflow.model",
    "FlowParams": "gradflow.flow",
    "Trajectory": "gradflow.flow",
    "simulate": "gradflow.flow",
    "simulate_many": "gradflow.flow",
    "Problem": "gradflow.flow",
    "Numerics": "gradflow.flow",
    "Recording": "gradflow.flow",
    "Solution": "gradflow.flow",
    "SolveFailure": "gradflow.flow",
    "solve": "gradflow.flow",
    "solve_many": "gradflow.flow",
}
_SUBMODULES = ("capped", "design", "greedy", "noise", "sampling", "schedules", "theory", "training")

__all__ = sorted(list(_EXPORTS) + list(_SUBMODULES))

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from gradflow import capped, design, greedy, noise, sampling, schedules, theory, training
    from gradflow.flow import (
        FlowParams,
        Numerics,
        Problem,
        Recording,
        Solution,
        SolveFailure,
        Trajectory,
        simulate,
        simulate_many,
        solve,
        solve_many,
    )
    from gradflow.model import (
        ModelSpec,
        StepProbabilities,
        Theta,
        default_theta0,
        step_probabilities,
        transition_matrix,
    )
    from gradflow.objective import (
        expected_length,
        expected_loss,
        expected_reward,
        length_per_start,
        same_side_probability,
        traversal_per_start,
        traversal_probability,
    )
    from gradflow.task import ChainTask


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # any submodule: gradflow.flow, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
