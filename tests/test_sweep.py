"""Job-array sweeps: stable config hashes, one result file per config, resume skips solved configs."""

import json

import numpy as np
import pytest

import gradflow as gf
import gradflow.sweep as sweep
from gradflow.flow import FlowParams, Trajectory

SAVE_TS = np.array([0.0, 0.5, 1.0, 2.0])


def _configs():
    """Three configs of n = 4 (one structure) and one of n = 3 (a second group)."""
    configs = [
        FlowParams(gf.ChainTask.uniform(4), theta0=gf.Theta(a, 0.0, 0.0), t1=2.0, save_ts=SAVE_TS)
        for a in (0.1, 0.3, 0.5)
    ]
    configs.append(FlowParams(gf.ChainTask.uniform(3), t1=2.0, save_ts=SAVE_TS))
    return configs


@pytest.fixture
def counted(monkeypatch):
    """Count the configs handed to simulate_many and the calls (one per structure group)."""
    calls = []
    real = sweep.simulate_many

    def counting(configs, progress=False, devices=None):
        calls.append(len(configs))
        return real(configs, progress=progress, devices=devices)

    monkeypatch.setattr(sweep, "simulate_many", counting)
    return calls


def test_hash_is_stable_and_canonical():
    cfg = _configs()[1]
    h = sweep.config_hash(cfg)
    assert len(h) == 16 and int(h, 16) >= 0
    assert sweep.config_hash(cfg.to_dict()) == h
    # key order, JSON round trip and int-vs-float spellings do not change the hash
    shuffled = dict(reversed(list(json.loads(json.dumps(cfg.to_dict())).items())))
    shuffled["t1"] = 2
    assert sweep.config_hash(shuffled) == h
    assert sweep.config_hash(FlowParams.from_dict(cfg.to_dict())) == h
    hashes = {sweep.config_hash(c) for c in _configs()}
    assert len(hashes) == 4


def test_hash_pinned():
    """The file name of a fixed config must not drift between versions (results on disk stay valid)."""
    cfg = FlowParams(gf.ChainTask.uniform(4), t1=2.0, save_ts=SAVE_TS)
    expected = __import__("hashlib").sha256(
        json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    assert sweep.config_hash(cfg) == expected


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
        np.testing.assert_allclose(trajectory.ts, SAVE_TS)
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
    # the sweep runs the vmapped program, whose small tridiagonal solves use unrolled elimination
    # instead of LAPACK: the same trajectory up to round-off, far below the solver's rtol of 1e-8
    np.testing.assert_allclose(Trajectory.load(result).theta, direct.theta, rtol=1e-10, atol=1e-12)


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
