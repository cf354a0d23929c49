"""Sweeps: many flow configs from one JSON file, one result file per config, resumable.

``run_sweep(config_path, out_dir)`` reads a JSON file holding one ``FlowParams.to_dict()`` dict or a
list of them, groups the configs by structure (n, attention kind, solver, coords, save_ts length, ...:
everything that fixes the compiled program) and solves each group with ``simulate_many``: one
compilation per group.  Config i is saved as ``out_dir/<config_hash>.npz`` and ``.json`` (the
``Trajectory.save`` pair, which holds the config), so ``Trajectory.load(out_dir / f"{h}.npz")``
restores the result with its config.  ``config_hash`` is the first 16 hex digits of the sha256 of the
canonical JSON of the config (sorted keys, no spaces; the dict is first passed through
``FlowParams.from_dict(...).to_dict()``, so equivalent spellings such as 1 and 1.0 hash alike).
With ``resume=True`` configs whose .npz and .json both exist are skipped.

Splitting a sweep over machines (every config is independent; results never collide because the
file name is the config's hash):

* Job array (SLURM, PBS, ...): give every task the same JSON and its own slice,
  ``gradflow sweep configs.json --out results --resume --index $SLURM_ARRAY_TASK_ID --count $SLURM_ARRAY_TASK_COUNT``
  takes configs[index::count].  Or write one JSON per task with ``write_configs``.
* ``jax.distributed`` (multi-process, e.g. one process per host or GPU)::

      import jax
      jax.distributed.initialize()            # coordinator address etc. from the environment
      from gradflow.sweep import run_sweep
      run_sweep("configs.json", "results", resume=True,
                index=jax.process_index(), count=jax.process_count())

  Each process solves configs[process_index::process_count] on its local devices; no collective
  is needed.  Within one process, ``simulate_many(configs, devices=jax.local_devices())`` shards a
  group over that process's devices (pass ``devices=`` to ``run_sweep``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from gradflow.flow import FlowParams, Trajectory, simulate_many


def _as_dict(config) -> dict:
    return config.to_dict() if isinstance(config, FlowParams) else dict(config)


def canonical_json(config) -> str:
    """The canonical JSON of a config (FlowParams or its dict): normalised, sorted keys, compact."""
    normalised = FlowParams.from_dict(_as_dict(config)).to_dict()
    return json.dumps(normalised, sort_keys=True, separators=(",", ":"))


def config_hash(config) -> str:
    """First 16 hex digits of sha256(canonical JSON of the config): the config's result file name."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def write_configs(configs: Sequence, path: str | Path) -> Path:
    """Write FlowParams (or their dicts) as a JSON list that ``run_sweep`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([_as_dict(c) for c in configs], indent=1))
    return path


def read_configs(path: str | Path) -> list[FlowParams]:
    """The configs of a sweep file (one dict or a list of dicts)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise ValueError(f"{path}: expected a FlowParams.to_dict() dict or a list of them")
    return [FlowParams.from_dict(c) for c in data]


def result_path(out_dir: str | Path, config) -> Path:
    """Where the result of ``config`` lives: out_dir/<config_hash>.npz (and .json beside it)."""
    return Path(out_dir) / f"{config_hash(config)}.npz"


def _structure_key(params: FlowParams):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef, tuple(np.shape(x) for x in leaves)


def group_by_structure(configs: Sequence[FlowParams]) -> list[list[int]]:
    """Indices of ``configs`` grouped so that each group stacks (one compilation), in first-seen order."""
    groups: dict = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(_structure_key(cfg), []).append(i)
    return list(groups.values())


def run_sweep(
    config_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    index: int = 0,
    count: int = 1,
    devices=None,
) -> list[Path]:
    """Solve the configs of ``config_path`` (those with i % count == index) into ``out_dir``.

    Returns the result paths of this slice's configs, in file order (skipped ones included).
    ``progress`` prints one line per group; ``devices`` is passed to ``simulate_many``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need 0 <= index < count, got index={index}, count={count}")
    configs = read_configs(config_path)[index::count]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [result_path(out_dir, c) for c in configs]
    todo, seen = [], set()
    for i, path in enumerate(paths):
        done = path.exists() and path.with_suffix(".json").exists()
        if (resume and done) or path in seen:
            continue
        seen.add(path)
        todo.append(i)
    if progress:
        print(f"sweep: {len(configs)} configs in this slice, {len(configs) - len(todo)} skipped, {len(todo)} to solve")
    pending = [configs[i] for i in todo]
    for group in group_by_structure(pending):
        batch = [pending[k] for k in group]
        trajectories = simulate_many(batch, progress=False, devices=devices)
        for k, trajectory in zip(group, trajectories):
            trajectory.save(paths[todo[k]])
        if progress:
            stats = trajectories[0].stats
            print(f"sweep: solved {len(batch)} configs (n = {batch[0].task.n}) "
                  f"compile {stats['compile_seconds']:.2f} s, run {stats['run_seconds']:.2f} s")
    return paths


def load_results(config_path: str | Path, out_dir: str | Path) -> list[Trajectory | None]:
    """The saved trajectories of a sweep file, in file order (None where not solved yet)."""
    out = []
    for cfg in read_configs(config_path):
        path = result_path(out_dir, cfg)
        out.append(Trajectory.load(path) if path.exists() else None)
    return out
