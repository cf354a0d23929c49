"""Shared fixtures.  Importing gradflow turns on float64, as for every user.

Each pytest-xdist worker keeps its own persistent compilation cache (read at a process's first compile):
two workers writing and reading one folder at once aborted a run in jax's cache read."""

import os

import numpy as np
import pytest

import gradflow  # noqa: F401  (enables jax_enable_x64)

if os.environ.get("PYTEST_XDIST_WORKER") and "GRADFLOW_CACHE_DIR" not in os.environ:
    _base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["GRADFLOW_CACHE_DIR"] = os.path.join(_base, "gradflow", f"jax-{os.environ['PYTEST_XDIST_WORKER']}")


@pytest.fixture
def rng():
    return np.random.default_rng(20260126)
