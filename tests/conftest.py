"""Shared fixtures.  Importing gradflow turns on float64, as for every user."""

import numpy as np
import pytest

import gradflow  # noqa: F401  (enables jax_enable_x64)


@pytest.fixture
def rng():
    return np.random.default_rng(20260126)
