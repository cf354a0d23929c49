"""Sweeps: many flow configs from one JSON file, one result file per config, resumable.

``run_sweep(config_path, out_dir)`` reads a JSON file holding one ``FlowParams.to_dict()`` dict or a
list of them, groups the configs by structure (attention kind, solver, coords, save_ts length, ...:
everything that fixes the compiled program; n up to its bucket for the uncapped linear-attention flows,
``gradflow.flow.bucketable``) and solves each group with ``simulate_many``: one compilation per group.
Config i is saved as ``out_dir/<config_hash>.npz`` and ``.json`` (the
``Trajectory.save`` pair, which holds the config), so ``Trajectory.load(out_dir / f"{h}.npz")``
restores the result with its config.  ``config_hash`` is the first 16 hex digits of the sha256 of the
canonical JSON of the config (sorted keys, no spaces; the dict is first passed through
``FlowParams.from_dict(...).to_dict()``, so equivalent spellings such as 1 and 1.0 hash alike).

A sweep never loses or fakes a result:

* Each result is written into a private temporary folder inside ``out_dir`` and then moved into
  place with ``os.replace`` (atomic on one file system), the ``.json`` last: a killed sweep leaves
  complete results and, at worst, a ``.tmp-*`` folder that every reader ignores (the next run on
  the same host removes it once its process is gone).
* ``resume=True`` skips a config only when its result loads completely (both files, arrays of the
  saved lengths, the config whose hash names the file); anything else, e.g. a truncated ``.npz``
  or ``.json``, counts as missing and is solved again.
* Results are written group by group (``batch_size`` caps a group), so a kill loses at most the
  batch in flight.  A config whose solve fails (steps ran out, a NaN reward, ...) is reported by
  ``simulate_many(..., on_error="report")`` and every other result of its batch is saved; the
  failures are raised together at the end as ``SweepError``.

Splitting a sweep over machines (every config is independent; results never collide because the
file name is the config's hash):

* Job array (SLURM, PBS, ...): give every task the same JSON and its own slice,
  ``gradflow sweep configs.json --out results --resume --index $SLURM_ARRAY_TASK_ID --count $SLURM_ARRAY_TASK_COUNT``
  takes configs[index::count].  Or write one JSON per task with ``write_configs``.
* submitit (Slurm, or its local executor on one machine): ``run_sweep(..., executor="slurm")`` (or
  ``"local"``, or any ``submitit.Executor``) launches the sweep as one job array of ``array_size``
  tasks, each running ``run_sweep(..., resume=True, index=i, count=array_size)``, waits for it and
  returns the result paths; ``submit_sweep`` returns the jobs without waiting.  From the shell:
  ``gradflow sweep configs.json --out results --executor slurm --array-size 32``.  Re-running the
  same command after a killed or failed job solves only the missing results.
* ``jax.distributed`` (multi-process, e.g. one process per host or GPU)::

      import jax
      jax.distributed.initialize()            # coordinator address etc. from the environment
      from gradflow.sweep import run_sweep
      run_sweep("configs.json", "results", resume=True,
                index=jax.process_index(), count=jax.process_count())

  Each process solves configs[process_index::process_count] on its local devices; no collective
  is needed.  Within one process a group runs on a thread per CPU core (``gradflow.flow.host_threads``),
  and ``simulate_many(configs, devices=jax.local_devices())`` shards a group over that process's devices
  (pass ``devices=`` to ``run_sweep``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from gradflow.config import canonical_json, config_hash  # noqa: F401  (re-exported)
from gradflow.flow import FlowParams, SolveFailure, Trajectory, alone, simulate_many

TMP_PREFIX = ".tmp-"
DEFAULT_ARRAY_SIZE = 8
EXECUTORS = ("local", "slurm")
# what a damaged, truncated or foreign result file raises when loaded
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


class SweepError(RuntimeError):
    """Some configs of a sweep could not be solved; every other result was saved.

    ``failures`` maps each failed config's hash to the error message.
    """

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        first = next(iter(self.failures.items()))
        super().__init__(f"{len(self.failures)} config(s) failed, the other results are saved (first: {first[0]}: {first[1]})")


def _as_dict(config) -> dict:
    return config.to_dict() if isinstance(config, FlowParams) else dict(config)


def write_configs(configs: Sequence, path: str | Path) -> Path:
    """Write FlowParams (or their dicts) as a JSON list that ``run_sweep`` reads (atomically).

    Args:
        configs: ``FlowParams`` or their ``to_dict()`` dicts.
        path: the JSON file to write (its folder is created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        tmp.write_text(json.dumps([_as_dict(c) for c in configs], indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_configs(path: str | Path) -> list[FlowParams]:
    """The configs of a sweep file (one dict or a list of dicts).

    ValueError names the file (and the config's index) for a missing or unreadable file, malformed
    JSON, or a config that ``FlowParams.from_dict`` rejects.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"config file {str(path)!r}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {str(path)!r}: not valid JSON ({error})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise ValueError(f"config file {str(path)!r}: expected a FlowParams.to_dict() dict or a list of them")
    configs = []
    for i, config in enumerate(data):
        try:
            configs.append(FlowParams.from_dict(config))
        except (KeyError, TypeError, ValueError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"config file {str(path)!r}: config {i}: {what}") from None
    return configs


def result_path(out_dir: str | Path, config) -> Path:
    """Where the result of ``config`` lives: out_dir/<config_hash>.npz (and .json beside it).

    Args:
        out_dir: the sweep's output folder.
        config (FlowParams | dict): the config (or its dict).

    Returns:
        The .npz path.
    """
    return Path(out_dir) / f"{config_hash(config)}.npz"


def load_result(path: str | Path, config=None) -> Trajectory | None:
    """The trajectory saved at ``path`` (.npz with its .json), or None unless it loads completely.

    Complete means: both files exist and load, every array has one row per save time, and (when
    ``config`` is given, or else from the file name) the stored config has the hash that names the
    file.  A truncated or damaged result therefore reads as "not solved", never as a wrong one.

    Args:
        path: the result's .npz path (any suffix is replaced).
        config (FlowParams | dict | None): the config whose hash the stored one must have (default: the
            hash in the file name).

    Returns:
        The ``Trajectory``, or None.
    """
    path = Path(path).with_suffix(".npz")
    if not (path.exists() and path.with_suffix(".json").exists()):
        return None
    try:
        trajectory = Trajectory.load(path)
        rows = {np.shape(getattr(trajectory, name))[0] for name in Trajectory.ARRAYS}
        expected = config_hash(config) if config is not None else path.stem
        if len(rows) != 1 or config_hash(trajectory.config) != expected:
            return None
    except _LOAD_ERRORS:
        return None
    return trajectory


def is_complete(path: str | Path, config=None) -> bool:
    """True when ``load_result(path, config)`` finds a complete result.

    Args:
        path: the result's .npz path.
        config (FlowParams | dict | None): the config whose hash the stored one must have (default: the
            hash in the file name).

    Returns:
        Whether a complete result is there.
    """
    return load_result(path, config) is not None


def _structure_key(params: FlowParams):
    """The structure of the program that solves ``params``: its program form (``gradflow.flow.alone``: a bucketable
    uncapped config laid out in its bucket of n, so every n of a bucket has one key)."""
    leaves, treedef = jax.tree_util.tree_flatten(alone(params))
    return treedef, tuple(np.shape(x) for x in leaves)


def group_by_structure(configs: Sequence[FlowParams]) -> list[list[int]]:
    """Indices of ``configs`` grouped so that each group is one compilation (``simulate_many``: the uncapped
    bucketable configs of one bucket of n together, whatever their n), in first-seen order."""
    groups: dict = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(_structure_key(cfg), []).append(i)
    return list(groups.values())


def _tmp_dir(out_dir: Path) -> Path:
    """A private temporary folder inside ``out_dir`` (same file system: os.replace is atomic)."""
    path = out_dir / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _remove_stale_tmp(out_dir: Path) -> None:
    """Remove temporary folders left by killed sweeps of this host (their process is gone)."""
    host = socket.gethostname()
    for path in out_dir.glob(f"{TMP_PREFIX}{host}-*"):
        try:
            pid = int(path.name[len(TMP_PREFIX) + len(host) + 1 :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(trajectory: Trajectory, path: str | Path) -> Path:
    """Save ``trajectory`` as ``path``.npz + .json so that each file appears complete or not at all.

    Both files are written into a temporary folder beside them and moved into place with
    ``os.replace``, the ``.npz`` first and the ``.json`` last (a result counts only when both load).

    Args:
        trajectory: the result to save.
        path: the result's path (its suffix is replaced by .npz / .json).

    Returns:
        The .npz path.
    """
    final = Path(path).with_suffix(".npz")
    tmp = _tmp_dir(final.parent)
    try:
        written = Path(trajectory.save(tmp / final.name)).with_suffix(".npz")
        os.replace(written, final)
        os.replace(written.with_suffix(".json"), final.with_suffix(".json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _chunks(indices: list[int], size: int | None) -> list[list[int]]:
    if size is None:
        return [indices]
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _solve_and_save(batch, paths, devices, failures: dict, progress: bool) -> None:
    """Solve one batch of one structure and save each result; a failed config is recorded in ``failures``."""
    try:
        results = simulate_many(batch, progress=False, devices=devices, on_error="report")
    except ValueError as error:  # an input a solve refuses (e.g. a stop_at level above the reward ceiling)
        if len(batch) == 1:
            failures[Path(paths[0]).stem] = str(error)
            return
        for cfg, path in zip(batch, paths):
            _solve_and_save([cfg], [path], devices, failures, progress=False)
        return
    solved = [r for r in results if isinstance(r, Trajectory)]
    for result, path in zip(results, paths):
        if isinstance(result, SolveFailure):
            failures[Path(path).stem] = result.reason
        else:
            save_atomic(result, path)
    if progress and solved:
        stats = solved[0].stats
        print(
            f"sweep: solved {len(solved)} of {len(batch)} configs (n = {batch[0].task.n}) "
            f"compile {stats['compile_seconds']:.2f} s, run {stats['run_seconds']:.2f} s"
        )


def run_sweep(
    config_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    index: int = 0,
    count: int = 1,
    devices=None,
    *,
    batch_size: int | None = None,
    executor=None,
    array_size: int | None = None,
    executor_params: dict | None = None,
    executor_folder: str | Path | None = None,
) -> list[Path]:
    """Solve the configs of ``config_path`` (those with i % count == index) into ``out_dir``.

    Configs are grouped by structure and each group solved by ``simulate_many``; results are saved
    with ``save_atomic`` under ``result_path``.

    Args:
        config_path: the sweep file (``write_configs``).
        out_dir: the folder of the results.
        resume: skip configs whose result is already complete (``is_complete``).
        progress: print one line per group.
        index: this slice's index, 0 <= index < count.
        count: the number of slices the file is split into, >= 1.
        devices (Sequence[jax.Device] | None): passed to ``simulate_many``.
        batch_size: caps how many configs are solved (and lost to a kill) at once (None: a whole group).
        executor (str | submitit.Executor | None): "local", "slurm" or a ``submitit.Executor``: run the whole
            file instead as one submitit job array, always resuming, wait for it and return every result
            path in file order (``index``/``count`` must stay 0/1 then).
        array_size: the number of array tasks with an executor (default min(#configs, 8)).
        executor_params: parameters of the executor (see ``submit_sweep``).
        executor_folder: submitit's folder (see ``submit_sweep``).

    Returns:
        The result paths of this slice's configs, in file order (skipped ones included).

    Raises:
        SweepError: after saving everything else, when some configs could not be solved.
        ValueError: a bad config file, or index/count/batch_size out of range (or index/count set with
            an executor).
    """
    if executor is not None:
        if (index, count) != (0, 1):
            raise ValueError("index/count: an executor splits the sweep itself; leave index=0, count=1")
        jobs = submit_sweep(
            config_path,
            out_dir,
            executor=executor,
            array_size=array_size,
            devices=devices,
            batch_size=batch_size,
            executor_params=executor_params,
            executor_folder=executor_folder,
        )
        return wait_sweep(jobs, config_path, out_dir)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise ValueError(f"index must be an integer with 0 <= index < count, got index={index!r}, count={count}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    configs = read_configs(config_path)[index::count]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir)
    paths = [result_path(out_dir, c) for c in configs]
    todo, seen = [], set()
    for i, path in enumerate(paths):
        if path in seen or (resume and is_complete(path, configs[i])):
            continue
        seen.add(path)
        todo.append(i)
    if progress:
        print(f"sweep: {len(configs)} configs in this slice, {len(configs) - len(todo)} skipped, {len(todo)} to solve")
    pending = [configs[i] for i in todo]
    failures: dict[str, str] = {}
    for group in group_by_structure(pending):
        for chunk in _chunks(group, batch_size):
            _solve_and_save([pending[k] for k in chunk], [paths[todo[k]] for k in chunk], devices, failures, progress)
    if failures:
        raise SweepError(failures)
    return paths


def load_results(config_path: str | Path, out_dir: str | Path) -> list[Trajectory | None]:
    """The saved trajectories of a sweep file, in file order (None where not solved or incomplete).

    Args:
        config_path: the sweep file.
        out_dir: the folder of the results.

    Returns:
        One ``Trajectory`` or None per config.
    """
    return [load_result(result_path(out_dir, cfg), cfg) for cfg in read_configs(config_path)]


# --------------------------------------------------------------------------------------------------
# submitit: one job array per sweep
# --------------------------------------------------------------------------------------------------


def _array_task(config_path: str, out_dir: str, index: int, count: int, batch_size, devices) -> list[str]:
    """One array task: its slice of the sweep, resumed (runs inside the submitit job)."""
    paths = run_sweep(
        config_path, out_dir, resume=True, progress=True, index=index, count=count, devices=devices, batch_size=batch_size
    )
    return [str(p) for p in paths]


# what submitit's LocalExecutor reads from update_parameters (it ignores any other name silently)
LOCAL_EXECUTOR_PARAMS = ("timeout_min", "gpus_per_node", "visible_gpus", "tasks_per_node", "nodes", "signal_delay_s", "setup")
# submitit's AutoExecutor's generic names (``slurm_<name>`` for Slurm's own, e.g. slurm_partition)
GENERIC_EXECUTOR_PARAMS = ("timeout_min", "name", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb")


def executor_param_names(kind: str) -> tuple[str, ...]:
    """The parameter names an executor of ``kind`` ("local" or "slurm") accepts, sorted.

    "local": ``LOCAL_EXECUTOR_PARAMS``; "slurm": ``GENERIC_EXECUTOR_PARAMS`` plus ``slurm_<name>``
    for every parameter of submitit's SlurmExecutor (read from submitit when it is installed).
    """
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)} or a submitit.Executor, got {kind!r}")
    if kind == "local":
        return tuple(sorted(LOCAL_EXECUTOR_PARAMS))
    try:
        import submitit

        slurm = submitit.SlurmExecutor._valid_parameters()
    except (ImportError, AttributeError):
        slurm = ()
    return tuple(sorted(set(GENERIC_EXECUTOR_PARAMS) | {f"slurm_{name}" for name in slurm}))


def check_executor_params(kind: str, params: dict) -> None:
    """ValueError naming a parameter that an executor of ``kind`` does not accept (``executor_param_names``).

    Args:
        kind: "local" or "slurm".
        params: the parameter names (and values) to check.

    Raises:
        ValueError: a name the executor does not accept, or an unknown kind.
    """
    known = executor_param_names(kind)
    for name in params:
        if name not in known:
            raise ValueError(f"executor parameter {name!r} is not one the {kind} executor accepts: {', '.join(known)}")


def make_executor(kind: str, folder: str | Path, **params):
    """A submitit executor: ``kind`` "local" (subprocesses on this machine) or "slurm".

    The local executor's default timeout is raised from submitit's 2 minutes to 24 hours.

    Args:
        kind: "local" or "slurm".
        folder: submitit's folder for logs and pickles.
        **params (Any): go to ``executor.update_parameters`` (e.g. ``timeout_min``, ``slurm_partition``,
            ``cpus_per_task``, ``gpus_per_node``, ``mem_gb``).

    Returns:
        executor (submitit.Executor): the configured executor.

    Raises:
        ValueError: an unknown kind, or a parameter name the executor does not accept
            (``check_executor_params``; submitit's local executor would ignore it).
    """
    import submitit

    check_executor_params(kind, params)

    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        params = {"timeout_min": 24 * 60, **params}
    elif kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        raise ValueError(f"executor must be one of {list(EXECUTORS)} or a submitit.Executor, got {kind!r}")
    if params:
        executor.update_parameters(**params)
    return executor


def submit_sweep(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    executor="local",
    array_size: int | None = None,
    devices=None,
    batch_size: int | None = None,
    executor_params: dict | None = None,
    executor_folder: str | Path | None = None,
):
    """Launch the sweep as one submitit job array; returns the list of jobs (one per array task).

    Task i runs ``run_sweep(config_path, out_dir, resume=True, index=i, count=array_size)``, so the
    tasks never share a config, and re-submitting after a killed task solves only what is missing.

    Args:
        config_path: the sweep file (read here first, so a bad file fails before any job).
        out_dir: the folder of the results.
        executor (str | submitit.Executor): "local", "slurm" (made with ``make_executor(kind,
            executor_folder, **executor_params)``) or a configured ``submitit.Executor`` (then
            ``executor_params`` are applied to it when given).
        array_size: the number of array tasks (default min(#configs, 8)).
        devices (Sequence[jax.Device] | None): passed to each task's ``run_sweep``.
        batch_size: passed to each task's ``run_sweep``.
        executor_params: executor parameters (``make_executor``).
        executor_folder: submitit's folder (default ``out_dir/.submitit``).

    Returns:
        jobs (list[submitit.Job]): the submitit jobs, one per array task.

    Raises:
        ValueError: a bad config file, array_size < 1, or a bad executor or parameter.
    """
    config_path, out_dir = Path(config_path).resolve(), Path(out_dir).resolve()
    configs = read_configs(config_path)  # fail here, not in every task, on a bad file
    if array_size is None:
        array_size = max(1, min(len(configs), DEFAULT_ARRAY_SIZE))
    if isinstance(array_size, bool) or not isinstance(array_size, int) or array_size < 1:
        raise ValueError(f"array_size must be an integer >= 1, got {array_size!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(executor, str):
        folder = Path(executor_folder) if executor_folder is not None else out_dir / ".submitit"
        executor = make_executor(executor, folder, **(executor_params or {}))
    elif executor_params:
        executor.update_parameters(**executor_params)
    task = functools.partial(
        _array_task, str(config_path), str(out_dir), count=array_size, batch_size=batch_size, devices=devices
    )
    return executor.map_array(task, list(range(array_size)))


def wait_sweep(jobs, config_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Wait for the jobs of ``submit_sweep``; the result paths of every config, in file order.

    Args:
        jobs (Sequence[submitit.Job]): the jobs ``submit_sweep`` returned.
        config_path: the sweep file.
        out_dir: the folder of the results.

    Returns:
        The result path of every config, in file order.

    Raises:
        SweepError: a job failed or was killed, or a result is still missing; the results that were
            saved stay, and re-running the sweep (it resumes) solves only the rest.
    """
    failures = {}
    for job in jobs:
        try:
            job.result()
        except Exception as error:  # noqa: BLE001 - submitit re-raises whatever the task raised
            failures[f"job {job.job_id}"] = (
                f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            )
    configs = read_configs(config_path)
    paths = [result_path(out_dir, c) for c in configs]
    missing = {p.stem: "no complete result" for p, c in zip(paths, configs) if not is_complete(p, c)}
    if failures or missing:
        raise SweepError({**failures, **missing})
    return paths
