"""Shared test helpers: random parameters, the model grid, pytest ids and the solver list.

The numerical references (dense float64 solves, dense matrix powers, the mpmath chain) live in
tests/reference.py; everything else more than one test file needs lives here.
"""

from __future__ import annotations

import pytest

import gradflow as gf
from gradflow.flow import SOLVERS

THETA_SIZE = gf.Theta(0.0, 0.0, 0.0).as_array().shape[-1]  # the model's parameter count (5)
ATTENTIONS = ("linear", "softmax")


def random_theta(rng, scale: float = 1.0) -> gf.Theta:
    """A Theta with every number drawn N(0, scale^2)."""
    return gf.Theta.from_array(rng.normal(0.0, scale, size=THETA_SIZE))


def model_grid(isolated=(0, 3)) -> list[dict]:
    """ModelSpec keywords for every attention kind x self-loops masked/kept x ``isolated`` (attention slowest)."""
    return [
        dict(attention=attention, mask_self=mask, n_isolated=iso)
        for attention in ATTENTIONS
        for mask in (True, False)
        for iso in isolated
    ]


def model_id(model: gf.ModelSpec) -> str:
    """A pytest id for a ModelSpec: attention, mask and isolated vertices."""
    return f"{model.attention}-mask{model.mask_self}-iso{model.n_isolated}"


def case_id(case) -> str:
    """A pytest id for a grid case: (n, ModelSpec) or (n, cap, ModelSpec keywords)."""
    if len(case) == 2:
        n, model = case
        return f"n{n}-{model_id(model)}"
    n, cap, kw = case
    return f"n{n}-T{cap}-" + "-".join(f"{k}{v}" for k, v in kw.items())


def slow_case(*values):
    """One ``pytest.mark.parametrize`` case kept out of the default run (``pytest -m slow`` runs it)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def solver_params() -> list:
    """Every key of ``gradflow.flow.SOLVERS`` for ``pytest.mark.parametrize``: tsit5 (the default) in the default run,
    every other solver in the slow run (tests/test_flow.py::test_every_solver_runs_the_default_preset runs each)."""
    return [s if s == "tsit5" else slow_case(s) for s in SOLVERS]
