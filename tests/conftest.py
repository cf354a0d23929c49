"""Shared fixtures.  Importing gradflow turns on float64, as for every user.

The suite's xdist workers run with the persistent compilation cache off (``GRADFLOW_NO_CACHE``): reading
it crashed a worker in two clean-clone runs (an abort, then a segmentation fault, each inside jax's
``compilation_cache.get_executable_and_time``, each test passing alone on the same cache), and a crashed
worker fails the run.  Tests of the cache itself give their subprocesses their own folder."""

import os

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER") and "GRADFLOW_CACHE_DIR" not in os.environ:
    os.environ.setdefault("GRADFLOW_NO_CACHE", "1")

import gradflow  # noqa: E402,F401  (enables jax_enable_x64)


@pytest.fixture
def rng():
    return np.random.default_rng(20260126)
