"""Discrete training (gradflow.training): exact-gradient descent with optax optimizers, sampled REINFORCE
with a TrainConfig, the aliases in gradflow.sampling, and the two figures of issue 14 (horizon,
authors_setting) with their claims.
"""

import json

import jax
import numpy as np
import optax
import pytest

import gradflow as gf
from gradflow import capped, compile_cache, greedy, readouts, sampling, training
from gradflow.flow import FlowParams
from gradflow.training import TrainConfig

N = 4
STEPS = 4  # one step count everywhere: the scans compile once per optimizer
CAPPED = FlowParams(gf.ChainTask.uniform(N), gf.ModelSpec(mask_self=False, max_len=N + 1), gf.Theta(0.0, 0.0, 0.0))


def exact_grad(params, x):
    return jax.grad(lambda v: capped.expected_reward(gf.Theta.from_array(v), params.task, params.model))(x)


def test_exact_descent_matches_a_manual_loop_with_the_capped_gradient():
    """SGD: theta_{k+1} = theta_k + lr grad J_T; Adam: the optax update on -grad J_T."""
    lr, steps = 0.5, STEPS
    grad = jax.jit(lambda x: exact_grad(CAPPED, x))
    for optimizer in ("sgd", "adam"):
        run = training.gradient_descent(CAPPED, lr, steps, optimizer=optimizer)
        opt = optax.sgd(lr) if optimizer == "sgd" else optax.adam(lr)
        x = CAPPED.theta0.as_array()
        state = opt.init(x)
        for k in range(steps):
            np.testing.assert_allclose(run.theta[k], x, rtol=1e-12, atol=1e-14)
            update, state = opt.update(-grad(x), state, x)
            x = optax.apply_updates(x, update)
        np.testing.assert_allclose(run.theta[steps], x, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(run.ts, lr * np.arange(steps + 1))
        assert run.stats["optimizer"] == optimizer and run.stats["max_len"] == N + 1


def test_recorded_read_outs_are_the_capped_and_greedy_ones():
    run = training.gradient_descent(CAPPED, 0.05, STEPS, optimizer="adam")
    k = 3
    theta = gf.Theta.from_array(run.theta[k])
    per = capped.per_start(theta, CAPPED.task, CAPPED.model)
    np.testing.assert_allclose(run.reward[k], capped.expected_reward(theta, CAPPED.task, CAPPED.model), rtol=1e-13)
    np.testing.assert_allclose(run.success_per_start[k], per.success, rtol=1e-13)
    np.testing.assert_allclose(run.reach_per_start[k], per.reach, rtol=1e-13)
    np.testing.assert_allclose(run.expected_length[k], capped.expected_length(theta, CAPPED.task, CAPPED.model), rtol=1e-13)
    g = greedy.greedy_metrics(theta, CAPPED.task, CAPPED.model)
    np.testing.assert_allclose(run.greedy_reach_rate[k], g.reach_rate)
    np.testing.assert_allclose(run.greedy_accuracy[k], g.accuracy)
    np.testing.assert_allclose(run.greedy_correct[k], np.asarray(g.per_start.correct, float))
    assert np.isnan(run.sampled_reward).all() and run.success_per_start.shape == (5, N - 1)


def test_any_optax_name_and_full_coords():
    """coords="full" divides the gradient by the orbit sizes; any optax optimizer name is accepted."""
    lr = 0.1
    full = training.gradient_descent(CAPPED, lr, STEPS, optimizer="sgd", coords="full")
    sizes = np.asarray(CAPPED.orbit_sizes())
    expected = lr * np.asarray(exact_grad(CAPPED, CAPPED.theta0.as_array())) / sizes
    np.testing.assert_allclose(full.theta[1] - full.theta[0], expected, rtol=1e-12, atol=1e-16)
    run = training.gradient_descent(CAPPED, lr, STEPS, optimizer="rmsprop")
    assert run.reward[-1] > run.reward[0]
    with pytest.raises(ValueError, match="optimizer"):
        training.gradient_descent(CAPPED, lr, 2, optimizer="nonsense")


def test_train_config_and_the_old_keywords():
    key = jax.random.key(0)
    config = TrainConfig(lr=0.05, steps=STEPS, batch=50, optimizer="adam")
    a = training.train(CAPPED, config=config, key=key)
    b = training.train(CAPPED, 0.05, STEPS, 50, key, optimizer="adam")
    c = sampling.train(CAPPED, 0.05, STEPS, 50, key, optimizer="adam", params="reduced")
    for other in (b, c):
        np.testing.assert_array_equal(a.theta, other.theta)
    assert a.stats["max_len"] == N + 1, "sampled rollouts must use the model's cap"
    d = training.train(CAPPED, config=config, key=key, lr=0.2)  # explicit arguments win
    assert d.stats["lr"] == 0.2 and not np.array_equal(d.theta, a.theta)
    with pytest.raises(ValueError, match="params"):
        training.train(CAPPED, 0.05, 3, 50, key, coords="full", params="reduced")
    with pytest.raises(ValueError, match="key"):
        training.train(CAPPED, 0.05, 3, 50)
    with pytest.raises(ValueError, match="batch"):
        training.train(CAPPED, 0.05, 3, key=key)
    for bad, field in [
        (dict(lr=0.0, steps=1), "lr"),
        (dict(lr=0.1, steps=0), "steps"),
        (dict(lr=0.1, steps=1, batch=1), "batch"),
        (dict(lr=0.1, steps=1, coords="half"), "coords"),
        (dict(lr=0.1, steps=1, max_len=0), "max_len"),
    ]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**bad)


def test_aliases_in_sampling():
    assert sampling.train is training.train
    assert sampling.gradient_descent is training.gradient_descent
    assert sampling.TrainingTrajectory is training.TrainingTrajectory
    from gradflow.sampling import gradient_descent, train  # noqa: F401  (from-imports keep working)


def test_reinforce_gradient_is_unbiased_for_the_capped_reward():
    """REINFORCE on capped rollouts (reward 0 without a terminal) estimates grad J_T within 4 SE."""
    theta = gf.Theta(0.4, -0.2, 0.1)
    grad, se = sampling.estimate_gradient(theta, CAPPED.task, CAPPED.model, jax.random.key(3), 20_000)
    exact = np.asarray(exact_grad(CAPPED, theta.as_array()))
    z = (np.asarray(grad[:3]) - exact[:3]) / np.asarray(se[:3])
    assert np.all(np.abs(z) < 4.0), (grad, se, exact)
    assert np.max(np.abs(exact[:3]) / np.asarray(se[:3])) > 8, "the estimate must resolve the gradient"


@pytest.mark.slow
def test_sampled_training_with_v_trained_steps_on_the_exact_gradient_in_the_ten_numbers():
    """V trained: sampled REINFORCE trains V too.  SGD at a tiny rate, so theta stays put: the mean step / lr of
    300 batches of 32 rollouts is grad J in all ten numbers within 4 SE; full coordinates train A and V."""
    model = gf.ModelSpec(tau=0.5, mask_self=False, max_len=5, values="trained")
    theta = gf.Theta(0.5, -0.2, 0.1, 0.3, -0.1, sigma=1.2, rho=0.8, omega=0.1, mu=-0.4, nu=0.2)
    config, lr = FlowParams(gf.ChainTask.uniform(4), model, theta), 1e-7
    run = training.train(config, lr=lr, steps=300, batch=32, key=jax.random.key(5), optimizer="sgd")
    steps = np.diff(run.theta, axis=0) / lr  # (300, 10): the REINFORCE estimates
    exact = np.asarray(exact_grad(config, theta.as_array("trained")))
    se = steps.std(axis=0, ddof=1) / np.sqrt(steps.shape[0])
    z = (steps.mean(axis=0) - exact) / se
    assert run.theta.shape == (301, 10) and np.all(np.abs(z) < 4.0), (z, exact)
    assert np.max(np.abs(exact) / se) > 8, "the estimate must resolve the gradient"
    full = training.train(config, lr=0.05, steps=3, batch=8, key=jax.random.key(6), optimizer="adam", coords="full")
    assert full.theta.shape == (4, 10) and np.all(full.theta[-1, 5:] != theta.as_array("trained")[5:])
    assert np.all(np.isfinite(full.theta_std)) and np.max(full.theta_std[-1, 5:]) > 0  # V's entries move apart


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def run_figure(name, tmp_path):
    from gradflow.cli import main

    assert main(["figures", name, "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{name}.png").exists()
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow  # three flow compilations: about a minute of CPU
def test_horizon_figure_claims(tmp_path):
    data = run_figure("horizon", tmp_path)
    assert data["claim"]["holds"], data["claim"]


@pytest.mark.slow  # about 30 s of CPU
def test_authors_setting_figure_claims(tmp_path):
    data = run_figure("authors_setting", tmp_path)
    assert data["claim"]["holds"], data["claim"]


def test_eval_tasks_recorded_at_every_step_and_saved(tmp_path):
    evals = {"hard": gf.ChainTask.hardest(5), "uni": gf.ChainTask.uniform(5)}
    params = gf.FlowParams(gf.ChainTask.k_hardest(5, 2), gf.ModelSpec(max_len=8), eval_tasks=evals)
    result = training.gradient_descent(params, 0.05, 20, "adam")
    for name, task in evals.items():
        assert set(result.eval_readouts[name]) == set(training.EVAL_RECORDED)
        expected = readouts.read(training.EVAL_RECORDED, result.theta[7], task, params.model)
        for key, value in expected.items():
            np.testing.assert_allclose(result.eval_readouts[name][key][7], value, rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(result.eval_reward[name], result.eval_readouts[name]["reward"])
    back = training.TrainingTrajectory.load(result.save(tmp_path / "run"))
    np.testing.assert_array_equal(back.theta, result.theta)
    reach = back.eval_readouts["hard"]["greedy_reach_rate"]
    np.testing.assert_array_equal(reach, result.eval_readouts["hard"]["greedy_reach_rate"])
    assert back.stats["optimizer"] == "adam" and back.config.model.max_len == 8


def test_gradient_descent_many_is_one_compilation_and_equals_one_by_one(tmp_path, empty_compile_cache):
    evals = {"hard": gf.ChainTask.hardest(4)}
    configs = [
        gf.FlowParams(gf.ChainTask.mixture(4, c), theta0=gf.Theta(a, 0.0, 0.0), eval_tasks=evals)
        for c, a in ((0.1, 0.0), (0.3, 0.2), (0.5, 0.1))
    ]
    lrs = [0.05, 0.1, 0.02]
    before = compile_cache.compilation_count()
    many = training.gradient_descent_many(configs, lrs=lrs, steps=15, optimizer="adam")
    assert compile_cache.compilation_count() == before + 1
    for params, lr, result in zip(configs, lrs, many):
        one = training.gradient_descent(params, lr, 15, "adam")
        np.testing.assert_allclose(result.ts, one.ts, rtol=1e-15)
        np.testing.assert_allclose(result.theta, one.theta, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(result.reward, one.reward, rtol=1e-12)
        np.testing.assert_allclose(result.eval_reward["hard"], one.eval_reward["hard"], rtol=1e-12)
    back = training.TrainingTrajectory.load(many[1].save(tmp_path / "b"))
    np.testing.assert_array_equal(back.reward, many[1].reward)
    with pytest.raises(ValueError, match="one per config"):
        training.gradient_descent_many(configs, lrs=[0.1, 0.2], steps=3)
    with pytest.raises(ValueError, match="lrs entry"):
        training.gradient_descent_many(configs, lrs=-0.1, steps=3)
