"""The read-out registry (gradflow.readouts): one definition of each read-out, read by the flow's recording,
discrete training, the phase analysis and the CLI alike."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_case

import gradflow as gf
from gradflow import cli, flow, readouts, theory, training, trajectory
from gradflow.flow import FlowParams, Recording

N = 4
MODEL = gf.ModelSpec(mask_self=False, n_isolated=1)  # every kind of move has positive probability
CAPPED = gf.ModelSpec(mask_self=False, max_len=N + 1)
THETA0 = gf.Theta(0.5, 0.1, -0.2, 0.0, 0.0)
HARDEST = gf.ChainTask.hardest(N)
CONFIG = FlowParams(gf.ChainTask.uniform(N), MODEL, THETA0, t1=2.0, save_ts=[0.0, 1.0, 2.0], eval_tasks={"hardest": HARDEST})
MOVES = ("forward_prob", "backward_prob", "switch_prob", "jump_prob", "isolated_prob")
MODELS = [MODEL, CAPPED, gf.ModelSpec(), gf.ModelSpec(attention="softmax", tau=0.5, n_isolated=2)]


def registry_at(theta, task, model, names=None):
    return {k: np.asarray(v) for k, v in readouts.read(names or tuple(readouts.READOUTS), theta, task, model).items()}


def test_the_flow_records_the_registry_values_and_theory_roots_on_them():
    """Recording, metrics_at, t_hit's quantity and theory's phase read-outs give the registry's value at each save."""
    traj = gf.simulate(CONFIG)
    for k in range(len(traj.ts)):
        want = registry_at(traj.theta[k], CONFIG.task, MODEL)
        at = flow.metrics_at(CONFIG, jnp.asarray(traj.theta[k]))
        for name in flow.RECORDED:
            np.testing.assert_allclose(getattr(traj, name)[k], want[name], rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(at[name], want[name], rtol=1e-14, err_msg=name)
            scalar = trajectory.quantity_fn(CONFIG, name, 0 if readouts.READOUTS[name].axis else None)(jnp.asarray(traj.theta[k]))
            np.testing.assert_allclose(scalar, np.ravel(want[name])[0], rtol=1e-14, err_msg=name)
        eval_reward = readouts.read(("reward",), traj.theta[k], HARDEST, MODEL)["reward"]
        np.testing.assert_allclose(traj.eval_reward["hardest"][k], eval_reward, rtol=1e-12)
        phase = np.asarray(theory._readouts(CONFIG, jnp.asarray(traj.theta[k])))
        np.testing.assert_allclose(phase, np.r_[want["forward_prob"], want["forward_prob"].min(), want["reward"]], rtol=1e-14)


@pytest.mark.parametrize("model", [MODEL, slow_case(CAPPED)], ids=["uncapped", "capped"])
def test_training_records_the_registry_values(model):
    run = training.gradient_descent(CONFIG.replace(model=model, eval_tasks={}), 0.5, 2)
    assert set(training.RECORDED) <= set(readouts.READOUTS)
    for k in range(len(run.ts)):
        want = registry_at(run.theta[k], CONFIG.task, model, training.RECORDED)
        got = training.readouts_at(CONFIG.task, model, jnp.asarray(run.theta[k]))
        for name in training.RECORDED:
            np.testing.assert_allclose(getattr(run, name)[k], want[name], rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(got[name], want[name], rtol=1e-14, err_msg=name)


@pytest.mark.parametrize("model", MODELS, ids=["isolated", "capped", "default", "softmax"])
def test_move_probabilities_are_conditional_on_moving_and_sum_to_one(model, rng):
    task = gf.ChainTask.uniform(5)
    for _ in range(3):
        theta = gf.Theta(*rng.normal(0.0, 2.0, size=5))
        values = registry_at(theta, task, model, MOVES)
        np.testing.assert_allclose(sum(values[name] for name in MOVES), 1.0, rtol=1e-14)
        steps = gf.step_probabilities(theta, task, model)
        np.testing.assert_allclose(values["forward_prob"], steps.forward_given_move, rtol=1e-13)
        np.testing.assert_allclose(values["switch_prob"], steps.switch / (1.0 - steps.stay), rtol=1e-12)


@pytest.mark.parametrize("model", [*MODELS[:3], slow_case(MODELS[3])], ids=["isolated", "capped", "default", "softmax"])
def test_every_read_out_has_its_declared_shape_and_range(model, rng):
    task = gf.ChainTask.uniform(5)
    values = registry_at(gf.Theta(*rng.normal(0.0, 1.0, size=5)), task, model)
    assert set(values) == set(readouts.READOUTS)
    for name, readout in readouts.READOUTS.items():
        assert readout.name == name and readout.description and readout.axis in readouts.AXES
        assert values[name].shape == readout.shape(task.n), name
        finite = values[name][np.isfinite(values[name])]
        if readout.probability:
            assert np.all((finite >= -1e-15) & (finite <= 1 + 1e-15)), (name, values[name])
    np.testing.assert_allclose(values["reward"], np.sum(task.start_probs * values["success_per_start"]), rtol=1e-13)
    if model.max_len is None:
        assert np.all(values["reach_per_start"] == 1.0) and values["reach_probability"] == 1.0


def test_unknown_names_raise_naming_the_allowed_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown read-out 'bogus'.*'reward'.*'greedy_accuracy'"):
        readouts.read(("reward", "bogus"), THETA0, CONFIG.task, MODEL)
    with pytest.raises(ValueError, match="unknown read-out 'bogus'.*'traversal_prob'"):
        Recording(readouts=("bogus",))
    with pytest.raises(ValueError, match="flow records the read-outs .*'forward_prob'.*not 'greedy_accuracy'"):
        FlowParams(CONFIG.task, readouts=("greedy_accuracy",))
    with pytest.raises(ValueError, match="readouts must be True, False or a tuple"):
        Recording(readouts=3)
    with pytest.raises(ValueError, match="already registered"):
        readouts.register("reward", lambda theta, task, model: 0.0)
    monkeypatch.setattr(readouts, "READOUTS", dict(readouts.READOUTS))
    readouts.register("alpha", lambda theta, task, model: theta.alpha, description="alpha itself")
    assert float(readouts.read(["alpha"], THETA0, CONFIG.task, MODEL)["alpha"]) == 0.5


@pytest.mark.slow
def test_recording_saves_only_the_asked_read_outs():
    config = CONFIG.replace(readouts=["reward", "traversal_prob"])
    assert config.readouts == ("reward", "traversal_prob")
    assert config.recording.readout_names() == ("reward", "traversal_prob")
    assert FlowParams.from_dict(config.to_dict()).readouts == ("reward", "traversal_prob")
    assert CONFIG.to_dict()["readouts"] is True and CONFIG.replace(readouts=False).to_dict()["readouts"] is False
    assert FlowParams.from_dict(CONFIG.replace(readouts=False).to_dict()).readouts is False
    assert CONFIG.recording.readout_names() == flow.RECORDED
    assert CONFIG.replace(readouts=False).recording.readout_names() == ("reward",)
    traj = gf.simulate(config)
    full = registry_at(traj.theta[-1], CONFIG.task, MODEL)
    np.testing.assert_allclose(traj.reward[-1], full["reward"], rtol=1e-12)
    np.testing.assert_allclose(traj.traversal_prob[-1], full["traversal_prob"], rtol=1e-12)
    assert np.isnan(traj.forward_prob).all() and np.isnan(traj.switch_prob).all() and np.isnan(traj.expected_length).all()
    with pytest.raises(ValueError, match="'forward_prob' was not recorded"):
        traj.t_hit(0.5, "forward_prob")
    report = cli.report(traj)
    assert "traversal_prob = " in report and readouts.READOUTS["traversal_prob"].description in report
    assert "forward_prob" not in report and "expected_length" not in report


def test_the_cli_flag_chooses_the_recorded_read_outs():
    args = cli.build_parser().parse_args(["simulate", "--out", "x", "--readouts", "traversal_prob", "switch_prob"])
    assert cli._flow_from_args(args).readouts == ("traversal_prob", "switch_prob")
    assert cli._flow_from_args(cli.build_parser().parse_args(["simulate", "--out", "x"])).readouts is True
