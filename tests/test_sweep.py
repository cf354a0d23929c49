"""Job-array sweeps: stable config hashes, one result file per config, resume skips solved configs,
atomic results (a killed or crashed sweep leaves only complete results; resume re-solves the rest)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gradflow as gf
import gradflow.sweep as sweep
from gradflow.flow import FlowParams, Trajectory

SAVE_TS = np.array([0.0, 0.5, 1.0, 2.0])


def _configs():
    """Three configs of n = 4 and 3 (one structure: one bucket of n) and one with three saves (a second group)."""
    configs = [
        FlowParams(gf.ChainTask.uniform(n), theta0=gf.Theta(a, 0.0, 0.0), t1=2.0, save_ts=SAVE_TS)
        for n, a in ((4, 0.1), (3, 0.3), (4, 0.5))
    ]
    configs.append(FlowParams(gf.ChainTask.uniform(3), t1=2.0, save_ts=SAVE_TS[1:]))
    return configs


@pytest.fixture
def counted(monkeypatch):
    """Count the configs handed to simulate_many and the calls (one per structure group)."""
    calls = []
    real = sweep.simulate_many

    def counting(configs, progress=False, devices=None, on_error="raise"):
        calls.append(len(configs))
        return real(configs, progress=progress, devices=devices, on_error=on_error)

    monkeypatch.setattr(sweep, "simulate_many", counting)
    return calls


def test_hash_is_stable_and_canonical():
    cfg = _configs()[1]
    h = sweep.config_hash(cfg)
    assert len(h) == 16 and set(h) <= set("0123456789abcdef")
    assert sweep.config_hash(cfg.to_dict()) == h
    # key order, JSON round trip and int-vs-float spellings do not change the hash
    shuffled = dict(reversed(list(json.loads(json.dumps(cfg.to_dict())).items())))
    shuffled["t1"] = 2
    assert sweep.config_hash(shuffled) == h
    assert sweep.config_hash(FlowParams.from_dict(cfg.to_dict())) == h
    hashes = {sweep.config_hash(c) for c in _configs()}
    assert len(hashes) == 4


def test_hash_pinned():
    """The file name of a fixed config must not drift between versions (results on disk stay valid).

    The literal is the hash gradflow 0.1.0 gave this config; fields added to ``to_dict`` since then
    are left out of the hash while they hold their defaults."""
    cfg = FlowParams(gf.ChainTask.uniform(4), t1=2.0, save_ts=SAVE_TS)
    assert sweep.config_hash(cfg) == "38f4fb75d126b1df"
    assert sweep.config_hash(FlowParams(gf.ChainTask.uniform(4), t1=2.0, save_ts=SAVE_TS, rtol=1e-9)) != "38f4fb75d126b1df"


@pytest.mark.slow
def test_sweep_writes_reloads_and_resumes(tmp_path, counted):
    configs = _configs()
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    paths = sweep.run_sweep(path, out, progress=False)
    assert sorted(counted) == [1, 3]  # one simulate_many per structure group
    assert [p.name for p in paths] == [f"{sweep.config_hash(c)}.npz" for c in configs]
    for cfg, p in zip(configs, paths):
        assert p.exists() and p.with_suffix(".json").exists()
        trajectory = Trajectory.load(p)
        assert trajectory.config.to_dict() == cfg.to_dict()
        np.testing.assert_allclose(trajectory.ts, cfg.save_ts)
        assert trajectory.forward_prob.shape == (len(cfg.save_ts), cfg.task.n - 1)
        assert trajectory.reward[-1] > trajectory.reward[0]

    counted.clear()
    sweep.run_sweep(path, out, resume=True, progress=False)
    assert counted == []  # everything exists: nothing solved

    paths[0].unlink()
    paths[3].with_suffix(".json").unlink()
    sweep.run_sweep(path, out, resume=True, progress=False)
    assert sorted(counted) == [1, 1]  # only the two incomplete results, one per group

    counted.clear()
    sweep.run_sweep(path, out, resume=False, progress=False)
    assert sorted(counted) == [1, 3]  # without resume everything is solved again


def test_sweep_matches_simulate(tmp_path):
    cfg = _configs()[0]
    path = tmp_path / "one.json"
    path.write_text(json.dumps(cfg.to_dict()))  # a single config, not a list
    (result,) = sweep.run_sweep(path, tmp_path, progress=False)
    direct = gf.flow.simulate(cfg, progress=False)
    # a group of one runs simulate's own program (a batch of one is no vmapped compilation of its own)
    np.testing.assert_allclose(Trajectory.load(result).theta, direct.theta, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_index_count_slices_partition(tmp_path, counted):
    configs = _configs()
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    slices = [sweep.run_sweep(path, tmp_path / "out", index=i, count=2, progress=False) for i in range(2)]
    assert [p.name for p in slices[0]] == [f"{sweep.config_hash(c)}.npz" for c in configs[0::2]]
    assert [p.name for p in slices[1]] == [f"{sweep.config_hash(c)}.npz" for c in configs[1::2]]
    assert sum(counted) == len(configs)
    assert all(r is not None for r in sweep.load_results(path, tmp_path / "out"))


def test_bad_inputs(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="to_dict"):
        sweep.run_sweep(path, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="index"):
        sweep.run_sweep(path, tmp_path / "out", index=2, count=2, progress=False)
    with pytest.raises(ValueError, match="cannot read"):
        sweep.read_configs(tmp_path / "missing.json")
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        sweep.read_configs(path)
    config = _configs()[0].to_dict()
    del config["t1"], config["task"]["n"]
    path.write_text(json.dumps([_configs()[1].to_dict(), config]))
    with pytest.raises(ValueError, match="config 1"):
        sweep.read_configs(path)
    with pytest.raises(ValueError, match="batch_size"):
        sweep.run_sweep(sweep.write_configs(_configs(), path), tmp_path / "out", batch_size=0, progress=False)


def _complete(out, configs):
    return [sweep.is_complete(sweep.result_path(out, c), c) for c in configs]


@pytest.mark.slow
def test_resume_resolves_truncated_results(tmp_path, counted):
    """A truncated .npz or .json (a result written by a killed process) counts as missing."""
    configs = _configs()[:3]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    paths = sweep.run_sweep(path, out, progress=False)
    full = paths[0].read_bytes()
    paths[0].write_bytes(full[: len(full) // 2])  # truncated arrays
    text = paths[1].with_suffix(".json").read_text()
    paths[1].with_suffix(".json").write_text(text[: len(text) // 2])  # truncated sidecar
    assert _complete(out, configs) == [False, False, True]
    assert sweep.load_results(path, out)[:2] == [None, None]  # never a half-read result
    counted.clear()
    sweep.run_sweep(path, out, resume=True, progress=False)
    assert counted == [2]  # the two damaged results, nothing else
    assert all(_complete(out, configs))
    assert paths[0].read_bytes() != full[: len(full) // 2]


@pytest.mark.slow
def test_crash_between_writes_leaves_no_partial_result(tmp_path, monkeypatch, counted):
    """A sweep that dies while moving a result into place leaves no result that looks complete."""
    configs = _configs()[:3]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    real_replace = os.replace
    moved = []

    def crash_on_second_json(src, dst):
        if Path(dst).parent == out and Path(dst).suffix == ".json":  # a result moved into place
            moved.append(dst)
            if len(moved) == 2:
                raise KeyboardInterrupt  # as if killed between the .npz and the .json of result 2
        return real_replace(src, dst)

    monkeypatch.setattr(sweep.os, "replace", crash_on_second_json)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(path, out, progress=False)
    monkeypatch.setattr(sweep.os, "replace", real_replace)
    assert _complete(out, configs) == [True, False, False]
    assert not list(out.glob(f"{sweep.TMP_PREFIX}*"))  # the temporary folder went with the crash
    first = sweep.result_path(out, configs[0]).stat().st_mtime_ns
    counted.clear()
    sweep.run_sweep(path, out, resume=True, progress=False)
    assert counted == [2] and all(_complete(out, configs))
    assert sweep.result_path(out, configs[0]).stat().st_mtime_ns == first  # not solved twice
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{sweep.config_hash(c)}.{ext}" for c in configs for ext in ("npz", "json")
    )


@pytest.mark.slow
def test_configs_stopping_at_different_times_and_a_failed_one(tmp_path, counted):
    """Issue 12: configs that stop at their event at different times (or never) in one sweep, and one
    that cannot finish (max_steps): the failure is reported, every other result is saved."""
    task = gf.ChainTask.uniform(3)
    ts = np.array([0.0, 0.5, 1.0])
    cases = [(1e3, 0.9), (0.1, 0.9), (1e12, 1.0 - 1e-12)]  # stops early; never reaches 0.9; runs out of steps
    configs = [
        FlowParams(task, t1=t1, save_ts=ts * t1, stop_at="threshold", reward_threshold=level, max_steps=40) for t1, level in cases
    ]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    with pytest.raises(sweep.SweepError) as info:
        sweep.run_sweep(path, out, progress=False)
    assert list(info.value.failures) == [sweep.config_hash(configs[2])]
    assert "max_steps" in str(info.value)
    assert _complete(out, configs) == [True, True, False]
    assert counted == [3]  # one batch: the failed config is reported, the others kept
    for cfg in configs[:2]:
        (direct,) = sweep.simulate_many([cfg])
        result = Trajectory.load(sweep.result_path(out, cfg))
        assert result.events == pytest.approx(direct.events)
        np.testing.assert_allclose(result.reward, direct.reward, rtol=1e-9)
    assert result.events["reward_threshold"] is None  # t1 = 0.1 comes before the threshold


KILL_SCRIPT = """
import sys
from gradflow import cli
sys.exit(cli.main(["sweep", sys.argv[1], "--out", sys.argv[2], "--batch-size", "1", "--resume"]))
"""


@pytest.mark.slow
def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path, counted):
    """Kill a `gradflow sweep` subprocess mid-sweep (SIGKILL, after some results): only complete
    results are left, and --resume solves exactly the missing ones, each once."""
    configs = [
        FlowParams(gf.ChainTask.uniform(4), theta0=gf.Theta(a, 0.0, 0.0), t1=2.0, save_ts=SAVE_TS)
        for a in np.linspace(0.05, 0.6, 12)
    ]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and len(list(out.glob("*.json"))) < 3:
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if sweep.is_complete(p)}
    assert 3 <= len(before) < len(configs), "kill the sweep mid-way"
    # whatever the kill interrupted: every result file pair present is complete or is ignored
    for p in out.glob("*.npz"):
        assert sweep.load_result(p) is not None or p.name not in before
    counted.clear()
    sweep.run_sweep(path, out, resume=True, progress=False)
    assert sum(counted) == len(configs) - len(before)  # no duplicates: the finished ones are skipped
    assert all(_complete(out, configs))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in before} == before
    assert len(list(out.glob("*.npz"))) == len(configs) and not list(out.glob(f"{sweep.TMP_PREFIX}*"))


# --------------------------------------------------------------------------------------------------
# submitit: the sweep as one job array (its local executor runs the tasks as subprocesses here)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_job_array(tmp_path):
    configs = _configs()[:3]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    paths = sweep.run_sweep(path, out, executor="local", array_size=2, executor_params={"timeout_min": 20})
    assert paths == [sweep.result_path(out, c) for c in configs]
    assert all(_complete(out, configs)) and len(list(out.glob("*.npz"))) == 3
    logs = list((out / ".submitit").glob("*_log.out"))
    assert len(logs) == 2  # one job array of two tasks
    assert sum("1 to solve" in p.read_text() or "2 to solve" in p.read_text() for p in logs) == 2
    with pytest.raises(ValueError, match="executor"):
        sweep.run_sweep(path, out, executor="pbs")
    with pytest.raises(ValueError, match="index/count"):
        sweep.run_sweep(path, out, executor="local", index=1, count=2)


@pytest.mark.slow
def test_submitit_killed_task_resumes_without_loss_or_duplicates(tmp_path):
    import submitit

    configs = [
        FlowParams(gf.ChainTask.uniform(4), theta0=gf.Theta(a, 0.0, 0.0), t1=2.0, save_ts=SAVE_TS)
        for a in np.linspace(0.05, 0.6, 16)
    ]
    path = sweep.write_configs(configs, tmp_path / "configs.json")
    out = tmp_path / "results"
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=30)
    jobs = sweep.submit_sweep(path, out, executor=executor, array_size=2, batch_size=1)
    assert len(jobs) == 2
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(list(out.glob("*.json"))) < 3:
        time.sleep(0.01)
    jobs[0].cancel()  # SIGINT, then SIGKILL: task 0 dies wherever it is
    with pytest.raises(Exception):  # noqa: B017  (the type depends on where the SIGKILL lands)
        jobs[0].result()
    jobs[1].result()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if sweep.is_complete(p)}
    assert len(before) < len(configs), "task 0 was killed before it finished"
    with pytest.raises(sweep.SweepError):
        sweep.wait_sweep(jobs, path, out)  # reports the missing results
    sweep.run_sweep(path, out, executor=executor, array_size=2, batch_size=4)  # re-run: resumes
    assert all(_complete(out, configs))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in before} == before  # none twice
    assert len(list(out.glob("*.npz"))) == len(configs) and not list(out.glob(f"{sweep.TMP_PREFIX}*"))
