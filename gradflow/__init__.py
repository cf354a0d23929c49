"""gradflow: exact gradient-flow dynamics of outcome-rewarded chain traversal by one attention layer.

Importing gradflow turns on float64 in JAX (``jax_enable_x64``): the closed-form rewards approach 1
and their gradients become tiny, so every computation runs in double precision.
"""

import jax

jax.config.update("jax_enable_x64", True)

from gradflow.model import ModelSpec, StepProbabilities, Theta, step_probabilities, transition_matrix  # noqa: E402
from gradflow.objective import (  # noqa: E402
    expected_length,
    expected_reward,
    length_per_start,
    same_side_probability,
    traversal_per_start,
    traversal_probability,
)
from gradflow.task import ChainTask  # noqa: E402
from gradflow.flow import FlowParams, Trajectory, simulate, simulate_many  # noqa: E402
from gradflow import sampling, theory  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ChainTask",
    "FlowParams",
    "Trajectory",
    "sampling",
    "simulate",
    "simulate_many",
    "theory",
    "ModelSpec",
    "StepProbabilities",
    "Theta",
    "expected_length",
    "expected_reward",
    "length_per_start",
    "same_side_probability",
    "step_probabilities",
    "transition_matrix",
    "traversal_per_start",
    "traversal_probability",
]
