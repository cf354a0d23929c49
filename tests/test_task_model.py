"""Configs: presets, pytree behaviour and validation errors that name the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow as gf


def test_presets():
    np.testing.assert_allclose(gf.ChainTask.uniform(5).start_probs, np.full(4, 0.25))
    np.testing.assert_allclose(gf.ChainTask.hardest(5).start_probs, [0, 0, 0, 1])
    np.testing.assert_allclose(gf.ChainTask.mixture(5, 0.1).start_probs, [0.1, 0, 0, 0.9])
    np.testing.assert_allclose(gf.ChainTask.mixture(5, 0.2, (1, 2)).start_probs, [0.1, 0.1, 0, 0.8])
    np.testing.assert_allclose(gf.ChainTask.k_hardest(5, 2).start_probs, [0, 0, 0.5, 0.5])


def test_theta_length_comes_from_its_fields():
    assert gf.Theta.fields() == ("alpha", "beta", "gamma", "eta", "delta")
    assert gf.Theta.size() == len(gf.Theta.fields()) == gf.Theta(0.3, 0, 0).as_array().shape[-1]
    with pytest.raises(ValueError, match=f"size {gf.Theta.size()}"):
        gf.Theta.from_array(np.zeros(gf.Theta.size() + 1))


def test_theta_round_trip_and_pytree():
    theta = gf.Theta(0.3, 0, 0)
    assert theta.as_array().dtype == jnp.float64
    np.testing.assert_array_equal(theta.as_array(), [0.3, 0, 0, 0, 0])
    x = jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(gf.Theta.from_array(x).as_array(), x)
    doubled = jax.tree_util.tree_map(lambda v: 2 * v, theta)
    assert float(doubled.alpha) == 0.6


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: gf.ChainTask(1, []), "n"),
        (lambda: gf.ChainTask.uniform(1), "n"),
        (lambda: gf.ChainTask(3, [0.5, 0.6]), "start_probs"),
        (lambda: gf.ChainTask(3, [1.5, -0.5]), "start_probs"),
        (lambda: gf.ChainTask(3, [1.0]), "start_probs"),
        (lambda: gf.ChainTask.mixture(4, 1.5), "easy_mass"),
        (lambda: gf.ChainTask.mixture(4, 0.1, (5,)), "easy_steps"),
        (lambda: gf.ModelSpec(tau=0.0), "tau"),
        (lambda: gf.ModelSpec(tau=-1.0), "tau"),
        (lambda: gf.ModelSpec(attention="quadratic"), "attention"),
        (lambda: gf.ModelSpec(n_isolated=-1), "n_isolated"),
        (lambda: gf.ModelSpec(context="future"), "context"),
        (lambda: gf.Theta.from_array(np.zeros(4)), "theta"),
        (lambda: gf.step_probabilities(gf.Theta(0, 0, 0), 1, gf.ModelSpec()), "n"),
        # right type, bad value: every public constructor says which field (issue 12.5)
        (lambda: gf.ChainTask.mixture(8, 0.1, (1.5,)), "easy_steps"),
        (lambda: gf.ChainTask.mixture(8, 0.1, (1, 1)), "easy_steps"),
        (lambda: gf.ChainTask.mixture(8, 0.1, ()), "easy_steps"),
        (lambda: gf.ChainTask.mixture(8, 0.1, (0,)), "easy_steps"),
        (lambda: gf.ChainTask.mixture(8, 0.1, None), "easy_steps"),
        (lambda: gf.ChainTask.mixture(8, float("nan")), "easy_mass"),
        (lambda: gf.ChainTask.mixture(8, "0.1"), "easy_mass"),
        (lambda: gf.ChainTask.mixture(8.0, 0.1), "n"),
        (lambda: gf.ChainTask.k_hardest(5, 2.0), "k"),
        (lambda: gf.ChainTask.k_hardest(5, 0), "k"),
        (lambda: gf.ChainTask.k_hardest(5, 5), "k"),
        (lambda: gf.ChainTask.hardest(True), "n"),
        (lambda: gf.ChainTask(3, [np.nan, 1.0]), "start_probs"),
        (lambda: gf.ChainTask(3, [np.inf, 0.0]), "start_probs"),
        (lambda: gf.ChainTask(3, "ab"), "start_probs"),
        (lambda: gf.ChainTask(3, None), "start_probs"),
        (lambda: gf.ChainTask(3, [[0.5, 0.5]]), "start_probs"),
    ],
)
def test_bad_input_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_probabilities_within_tolerance_are_accepted():
    gf.ChainTask(3, [0.5, 0.5 + 5e-10])


def test_presets_accept_numpy_integers():
    np.testing.assert_allclose(gf.ChainTask.mixture(np.int64(5), 0.2, np.array([1, 2])).start_probs, [0.1, 0.1, 0, 0.8])
    np.testing.assert_allclose(gf.ChainTask.mixture(5, 0.2, 2).start_probs, [0, 0.2, 0, 0.8])  # one distance
    np.testing.assert_allclose(gf.ChainTask.k_hardest(5, np.int32(2)).start_probs, [0, 0, 0.5, 0.5])


def test_task_under_vmap_is_not_checked_numerically():
    """Inside vmap the numbers are tracers: the checks look at shapes only and the task still builds."""
    probs = jnp.array([[0.5, 0.5], [0.2, 0.8]])
    out = jax.vmap(lambda p: gf.ChainTask(3, p).start_probs.sum())(probs)
    np.testing.assert_allclose(out, [1.0, 1.0])
