"""Shared fixtures.  Importing gradflow turns on float64, as for every user.

The suite's xdist workers run with the persistent compilation cache off (``GRADFLOW_NO_CACHE``): reading
it crashed a worker in two clean-clone runs (an abort, then a segmentation fault, each inside jax's
``compilation_cache.get_executable_and_time``, each test passing alone on the same cache), and a crashed
worker fails the run.  Tests of the cache itself give their subprocesses their own folder.

Those crashes, and a third one with the cache off, were the worker running out of memory maps: every
compiled flow holds about 1,000 and a worker crossed ``vm.max_map_count`` (65,530) near the end of the run.
``gradflow.compile_cache`` now gives maps back before each compilation; after every test the suite does
the same for the programs jitted outside it (``release_memory_maps``: only while over half the limit)."""

import os
from collections import OrderedDict

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER") and "GRADFLOW_CACHE_DIR" not in os.environ:
    os.environ.setdefault("GRADFLOW_NO_CACHE", "1")

import gradflow  # noqa: E402,F401  (enables jax_enable_x64)
from gradflow import compile_cache  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(20260126)


@pytest.fixture
def empty_compile_cache(monkeypatch):
    """An empty in-memory cache of compiled executables for one test: a test counting compilations then does
    not depend on which tests ran before it in the same worker."""
    monkeypatch.setattr(compile_cache, "_COMPILED", OrderedDict())


@pytest.fixture(autouse=True)
def _memory_maps_to_spare():
    yield
    compile_cache.release_memory_maps()
