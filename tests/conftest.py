"""Shared fixtures.  Importing gradflow turns on float64, as for every user."""

import numpy as np
import pytest

import gradflow  # noqa: F401  (enables jax_enable_x64)


@pytest.fixture
def rng():
    return np.random.default_rng(20260126)


def random_theta(rng, scale: float = 1.0):
    """A Theta with all five numbers drawn N(0, scale^2)."""
    return gradflow.Theta(*rng.normal(0.0, scale, size=5))
