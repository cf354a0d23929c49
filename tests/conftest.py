"""Shared fixtures.  Importing gradflow turns on float64, as for every user.

The suite's processes (the xdist controller and its workers) share one persistent compilation cache, a
fresh folder per run (``GRADFLOW_CACHE_DIR``, removed at the end): a program one worker compiled, the other
loads from disk instead of compiling it again (and a worker that gave an executable back reloads it), so a
cold run compiles each program about once.  ``GRADFLOW_CACHE_DIR`` or ``GRADFLOW_NO_CACHE=1`` set by the
caller is respected.  Tests of the cache itself give their subprocesses their own folder.

Memory maps: every compiled flow holds about 1,000 and a process past ``vm.max_map_count`` (65,530) aborts in
its next compilation (earlier runs lost workers that way, inside jax's cache read and elsewhere).
``gradflow.compile_cache`` gives maps back before each compilation; after every test the suite does the same
for the programs jitted outside it (``release_memory_maps``: only while over half the limit).

Compilation options: the suite's programs are compiled by XLA:CPU at backend optimisation level 0 with the classic
emitters (``XLA_FLAGS``, unless the caller sets it): the suite is almost all compilation, which this halves, while
the arithmetic, and so every value a test checks, is the same up to round-off (tests never time things)."""

import atexit
import os
import shutil
import tempfile
from collections import OrderedDict

import numpy as np
import pytest

if not os.environ.get("PYTEST_XDIST_WORKER") and "GRADFLOW_CACHE_DIR" not in os.environ:  # the controller, before workers start
    _SUITE_CACHE = tempfile.mkdtemp(prefix="gradflow-suite-cache-")
    os.environ["GRADFLOW_CACHE_DIR"] = _SUITE_CACHE
    atexit.register(shutil.rmtree, _SUITE_CACHE, True)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0")

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
