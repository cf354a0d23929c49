"""The command line: a smoke test per subcommand, one-line errors for bad inputs (checked before any
solve), internal errors never reported as bad inputs, packaging (version, declared dependencies,
figures from a regular install) and no surprises at import."""

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest

import gradflow as gf
from gradflow import cli, figure_cache

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n", "4", "--t1", "20", "--no-progress"]  # one small compiled flow shared by the smoke tests


def _one_line_error(capsys, code, *needles):
    """The command failed with a non-zero code and one stderr line naming the problem, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """`gradflow simulate` on the small preset: the .npz path (reused by `check --run`)."""
    out = tmp_path_factory.mktemp("run") / "small"
    assert cli.main(["simulate", *SMALL, "--out", str(out)]) == 0
    return out.with_suffix(".npz")


# --------------------------------------------------------------------------------------------------
# Smoke tests, one per subcommand
# --------------------------------------------------------------------------------------------------


def test_simulate_and_check(saved_run, capsys):
    trajectory = gf.Trajectory.load(saved_run)
    assert trajectory.config.task.n == 4 and float(trajectory.config.t1) == 20.0
    assert trajectory.reward[-1] > trajectory.reward[0]
    capsys.readouterr()
    assert cli.main(["check", "--run", str(saved_run)]) == 0
    out = capsys.readouterr().out
    assert out.strip()


def test_solver_auto_is_the_default_and_the_report_names_what_it_resolved_to(saved_run):
    trajectory = gf.Trajectory.load(saved_run)
    assert (trajectory.stats["solver"], trajectory.stats["resolved_solver"]) == ("auto", "tsit5")
    assert "solver: tsit5 (auto), " in cli.report(trajectory)
    stiff = ["simulate", "--out", "x", "--n", "5", "--allow-self", "--max-len", "6"]
    assert cli._flow_from_args(cli.build_parser().parse_args(stiff)).resolved_solver == "kvaerno5_newton"
    named = cli._flow_from_args(cli.build_parser().parse_args([*stiff, "--solver", "tsit5"]))
    assert (named.solver, named.resolved_solver) == ("tsit5", "tsit5")


def test_run_writes_the_figure_and_reports_the_final_time(tmp_path, capsys):
    figure = tmp_path / "fig" / "emergence.png"
    assert cli.main(["run", *SMALL, "--figure", str(figure)]) == 0
    for ext in ("png", "pdf", "json"):
        assert figure.with_suffix(f".{ext}").stat().st_size > 0
    out = capsys.readouterr().out
    assert "t_hit(0.9)" in out and "(final)" in out  # t1 = 20 is past the report's t = 10 row
    # the same run again: its figure comes from the figure cache (gradflow.figure_cache), the same files
    again = tmp_path / "again" / "emergence.png"
    assert cli.main(["run", *SMALL, "--figure", str(again)]) == 0
    for ext in ("png", "json"):
        assert again.with_suffix(f".{ext}").read_bytes() == figure.with_suffix(f".{ext}").read_bytes(), ext
    if figure_cache.folder() is not None:  # copied, so the PDF too (drawn again, it would hold a later date)
        assert again.with_suffix(".pdf").read_bytes() == figure.with_suffix(".pdf").read_bytes()


@pytest.mark.slow
def test_sweep_subcommand(tmp_path, capsys):
    configs = [gf.FlowParams(gf.ChainTask.uniform(4), t1=20.0, theta0=gf.Theta(a, 0.0, 0.0)) for a in (0.2, 0.3)]
    path = gf.sweep.write_configs(configs, tmp_path / "configs.json")
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert all(r is not None for r in gf.sweep.load_results(path, tmp_path / "out"))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert "2 skipped, 0 to solve" in capsys.readouterr().out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"gradflow {gf.__version__}" in out and "float64 enabled: True" in out


def test_figures_list_and_discovery(capsys):
    assert cli.main(["figures", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == cli.figure_names()
    assert {"emergence", "ood", "lazy_walk", "scaling"} <= set(names)
    assert cli.experiments_dir().samefile(ROOT / "experiments")  # the source checkout (or its installed copy)
    # `figures NAME --quick` for every figure runs in tests/test_experiments.py through cli.main


@pytest.mark.slow
def test_figures_in_parallel_run_each_script_in_its_own_process(tmp_path, capsys):
    args = types.SimpleNamespace(quick=True, out=str(tmp_path))
    assert cli._figures_in_parallel(["emergence", "no_such_figure"], args, 2) == 1  # one failed: non-zero
    out = capsys.readouterr()
    assert "emergence done" in out.out and "no_such_figure FAILED" in out.out and "no_such_figure" in out.err
    provenance = json.loads((tmp_path / "emergence.json").read_text())["provenance"]
    assert provenance["mode"] == "quick" and provenance["figure"] == "emergence"


def test_figures_jobs_must_be_positive(capsys):
    assert cli.main(["figures", "--all", "--jobs", "0"]) != 0
    assert "--jobs" in capsys.readouterr().err


def test_choice_lists_come_from_the_modules():
    from gradflow.flow import COORDS, SOLVER_CHOICES, SOLVERS
    from gradflow.model import ATTENTION_KINDS

    run = cli.build_parser()._subparsers._group_actions[0].choices["run"]
    choices = {a.dest: tuple(a.choices) for a in run._actions if a.choices}
    assert choices["solver"] == SOLVER_CHOICES == ("auto", *SOLVERS)
    assert choices["coords"] == tuple(COORDS)
    assert choices["attention"] == tuple(ATTENTION_KINDS)


@pytest.mark.slow
def test_values_trained_simulate_and_train_record_and_report_v(tmp_path, capsys):
    """--values trained: the config records V (model.values and theta0's ten numbers) and the reports print V."""
    theta0 = "0.3 0.1 0 0 0 0.9 1.1 0.05 -0.1 0.02".split()
    common = ["--n", "3", "--values", "trained", "--theta0", *theta0]
    assert cli.main(["simulate", *common, "--t1", "2", "--no-progress", "--out", str(tmp_path / "flow")]) == 0
    out = capsys.readouterr().out
    assert "final sigma = " in out and "mu - nu = " in out
    record = json.loads((tmp_path / "flow.json").read_text())["config"]
    assert record["model"]["values"] == "trained" and record["theta0"] == [float(x) for x in theta0]
    loaded = gf.Trajectory.load(tmp_path / "flow.npz")
    assert loaded.config.model.values == "trained" and np.shape(loaded.theta)[-1] == 10
    np.testing.assert_array_equal(loaded.theta[0], np.array(theta0, dtype=float))

    assert cli.main(["run", *common, "--t1", "2", "--no-progress", "--figure", str(tmp_path / "em.png")]) == 0
    out = capsys.readouterr().out
    assert "final sigma = " in out and "no emergence figure" in out and not (tmp_path / "em.png").exists()

    assert cli.main(["train", *common, "--steps", "3", "--lr", "0.1", "--out", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    assert "final sigma = " in out and "rho - omega = " in out
    record = json.loads((tmp_path / "train.json").read_text())["config"]
    assert record["model"]["values"] == "trained" and len(record["theta0"]) == 10

    assert cli.main(["train", "--n", "3", "--steps", "2", "--out", str(tmp_path / "fixed")]) == 0
    assert "sigma" not in capsys.readouterr().out  # the fixed V: the report of earlier versions
    assert len(json.loads((tmp_path / "fixed.json").read_text())["config"]["theta0"]) == 5


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the problem, non-zero exit, nothing solved
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_solve(monkeypatch):
    """Any solve fails the test: bad inputs must be caught before solving."""

    def forbidden(*args, **kwargs):
        raise AssertionError("solved despite a bad input")

    monkeypatch.setattr(gf.flow, "simulate", forbidden)
    monkeypatch.setattr(gf.flow, "simulate_many", forbidden)
    monkeypatch.setattr(gf.sweep, "simulate_many", forbidden)
    monkeypatch.setattr(gf.training, "gradient_descent", forbidden)
    monkeypatch.setattr(gf.training, "train", forbidden)
    monkeypatch.setattr(gf.design, "optimal_mixture", forbidden)


def _bad_files(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    good = tmp_path / "good.json"
    good.write_text(json.dumps([gf.FlowParams(gf.ChainTask.uniform(3)).to_dict()]))
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"task": ')
    missing_key = tmp_path / "missing_key.json"
    config = gf.FlowParams(gf.ChainTask.uniform(3)).to_dict()
    del config["task"]
    missing_key.write_text(json.dumps([config]))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    truncated.with_suffix(".json").write_text('{"config": ')
    garbage = tmp_path / "garbage.npz"  # a valid sidecar beside a file that is no zip archive
    garbage.write_bytes(b"not a zip archive")
    garbage.with_suffix(".json").write_text(
        json.dumps({"config": config | {"task": {"n": 3, "start_probs": [0.5, 0.5]}}, "events": {}, "stats": {}})
    )
    return {
        "file": a_file,
        "good": good,
        "malformed": malformed,
        "missing_key": missing_key,
        "truncated": truncated,
        "garbage": garbage,
    }


BAD = [
    (["run", "--n", "x"], ("--n", "invalid int")),
    (["run", "--n", "1"], ("n must be",)),
    (["run", "--tau", "-1"], ("tau",)),
    (["run", "--tau", "nan"], ("tau",)),
    (["run", "--solver", "euler"], ("--solver",)),
    (["run", "--attention", "cubic"], ("--attention",)),
    (["run", "--dist", "mixture", "--easy-mass", "1.5"], ("easy_mass",)),
    (["run", "--dist", "mixture", "--easy-steps", "9"], ("easy_steps",)),
    (["run", "--dist", "k_hardest", "--k", "8"], ("k must",)),
    (["run", "--threshold", "1.5"], ("reward_threshold",)),
    (["run", "--t1", "-1"], ("t1",)),
    (["run", "--rtol", "0"], ("rtol",)),
    (["run", "--n-isolated", "-2"], ("n_isolated",)),
    (["run", "--theta0", "1", "2", "3", "4", "5", "6"], ("--theta0", "1 to 5 numbers")),
    (["run", "--theta0", "x"], ("--theta0",)),
    (["design", "--n", "6", "--budget", "10", "--theta0", "1", "2", "3", "4", "5", "6"], ("--theta0", "1 to 5 numbers")),
    (["run", "--figure", "{file}/fig.png"], ("--figure",)),
    (["simulate", "--out", "{file}/x"], ("--out",)),
    (["simulate"], ("--out",)),
    (["check", "--run", "{file}/missing.npz"], ("--run", "no such result file")),
    (["check", "--run", "{truncated}"], ("--run", "not a readable gradflow result")),
    (["check", "--run", "{garbage}"], ("--run", "garbage.npz", "cannot be read as a gradflow result")),
    (["sweep", "{file}/missing.json", "--out", "{file}2"], ("config file", "cannot read")),
    (["sweep", "{malformed}", "--out", "{file}2"], ("config file", "not valid JSON")),
    (["sweep", "{missing_key}", "--out", "{file}2"], ("config 0", "task")),
    (["sweep", "{good}", "--out", "{file}"], ("--out", "not a directory")),
    (["sweep", "{good}", "--out", "{file}/sub"], ("--out",)),
    (["sweep", "{good}", "--out", "{file}2", "--index", "2", "--count", "2"], ("--index",)),
    (["sweep", "{good}", "--out", "{file}2", "--batch-size", "0"], ("--batch-size",)),
    (["sweep", "{good}", "--out", "{file}2", "--executor", "pbs"], ("--executor",)),
    (["sweep", "{good}", "--out", "{file}2", "--array-size", "2"], ("--executor",)),
    (["run", "--max-len", "0"], ("max_len",)),
    (["run", "--values", "nosuch"], ("--values", "invalid choice")),
    (["check", "--values", "trained"], ("check", "fixed V")),
    (["simulate", "--out", "x", "--theta0", *"0.3 0 0 0 0 1 1 0 0 0".split()], ("--theta0", "--values trained")),
    (["run", "--max-len", "x"], ("--max-len", "invalid int")),
    (["simulate", "--out", "x", "--eval", "hardest"], ("--eval", "NAME=TASK")),
    (["simulate", "--out", "x", "--eval", "a/b=hardest"], ("--eval", "NAME=TASK")),
    (["check", "--eval", "h=nonsense"], ("--eval", "k_hardest:<k>")),
    (["check", "--eval", "h=k_hardest:9"], ("--eval", "k must")),
    (["check", "--eval", "h=hardest", "--eval", "h=uniform"], ("--eval", "twice")),
    (["train", "--lr", "0"], ("lr",)),
    (["train", "--steps", "0"], ("steps",)),
    (["train", "--optimizer", "nosuch"], ("optimizer", "optax")),
    (["train", "--coords", "diagonal"], ("--coords",)),
    (["train", "--batch", "4"], ("--sampled",)),
    (["train", "--seed", "1"], ("--sampled",)),
    (["train", "--sampled", "--batch", "1"], ("batch",)),
    (["train", "--sampled", "--seed", "-1"], ("--seed",)),
    (["train", "--max-len", "-3"], ("max_len",)),
    (["train", "--eval", "x=d9", "--n", "5"], ("--eval", "d must")),
    (["train", "--out", "{file}/x"], ("--out",)),
    (["sweep", "{good}", "--out", "{file}2", "--max-len", "0"], ("--max-len",)),
    (["sweep", "{good}", "--out", "{file}2", "--eval", "hardest"], ("--eval", "NAME=TASK")),
    (["design", "--max-len", "0"], ("max_len",)),
    (["design", "--mean-easy-mass", "0.1", "--max-mean-easy-mass", "0.2"], ("contradicts", "--max-mean-easy-mass")),
    (
        ["sweep", "{good}", "--out", "{file}2", "--executor", "local", "--executor-param", "nosuch_param=1"],
        ("--executor-param", "'nosuch_param'", "timeout_min"),
    ),
    (["design", "--seed", "-1"], ("--seed",)),
    (["design", "--n", "6", "--lr", "inf"], ("lr",)),
    (["design", "--n", "6", "--schedule", "step:t=1,t=2,before=easiest,after=hardest"], ("'t' is given twice",)),
    (["figures", "no_such_figure"], ("unknown figure", "emergence")),
    (["figures"], ("--all",)),
    (["figures", "emergence", "--out", "{file}"], ("--out",)),
    (["nonsense"], ("invalid choice",)),
]


@pytest.mark.parametrize("argv, needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, needles, tmp_path, capsys, no_solve):
    files = _bad_files(tmp_path)
    argv = [a.format(**files) for a in argv]
    code = cli.main(argv)
    _one_line_error(capsys, code, *needles)
    assert code == cli.EXIT_INPUT


def test_simulate_out_an_existing_folder_writes_inside_it(saved_run, tmp_path, monkeypatch, capsys):
    trajectory = gf.Trajectory.load(saved_run)
    monkeypatch.setattr(gf.flow, "simulate", lambda *args, **kwargs: trajectory)
    folder = tmp_path / "results"
    folder.mkdir()
    assert cli.main(["simulate", *SMALL, "--out", str(folder)]) == 0
    assert (folder / f"{cli.SIMULATE_NAME}.npz").is_file() and (folder / f"{cli.SIMULATE_NAME}.json").is_file()
    assert not (tmp_path / "results.npz").exists() and not (tmp_path / "results.json").exists()
    capsys.readouterr()
    assert cli.main(["simulate", "--help"]) == 0
    assert f"folder: PATH/{cli.SIMULATE_NAME}.npz" in " ".join(capsys.readouterr().out.split())


def test_design_out_an_existing_folder_writes_inside_it(tmp_path, monkeypatch, capsys):
    class Result:
        def summary(self):
            return "summary"

        def save(self, path):
            Path(path).write_text("{}")
            return path

    monkeypatch.setattr(gf.design, "optimal_mixture", lambda *args, **kwargs: Result())
    folder = tmp_path / "designs"
    folder.mkdir()
    assert cli.main(["design", "--n", "6", "--budget", "10", "--out", str(folder)]) == 0
    assert (folder / "design-n6-t10.json").is_file() and not (tmp_path / "designs.json").exists()


def test_console_script_bad_value_has_no_traceback():
    """The real entry point, in a fresh process: one line on stderr, exit status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "gradflow.cli", "run", "--tau", "-1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "tau" in result.stderr and "Traceback" not in result.stderr


def test_internal_error_is_not_a_bad_input(tmp_path, monkeypatch, capsys):
    """A ValueError raised inside the solve is a bug: it propagates (traceback), exit code not 2."""

    def buggy(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(gf.flow, "simulate", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["simulate", *SMALL, "--out", str(tmp_path / "x")])


def test_solve_that_cannot_finish_is_one_line(tmp_path, monkeypatch, capsys):
    def out_of_steps(*args, **kwargs):
        raise RuntimeError("the flow solve ran out of steps at t=3: raise max_steps (now 16)\nmore detail")

    monkeypatch.setattr(gf.flow, "simulate", out_of_steps)
    code = cli.main(["simulate", *SMALL, "--out", str(tmp_path / "x")])
    err = _one_line_error(capsys, code, "solve failed", "max_steps")
    assert code == cli.EXIT_FAILED and "more detail" not in err


def test_sweep_with_failed_configs_is_one_line(tmp_path, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise gf.sweep.SweepError({"0123456789abcdef": "the flow solve ran out of steps"})

    monkeypatch.setattr(gf.sweep, "run_sweep", failing)
    path = gf.sweep.write_configs([gf.FlowParams(gf.ChainTask.uniform(3))], tmp_path / "c.json")
    code = cli.main(["sweep", str(path), "--out", str(tmp_path / "out")])
    _one_line_error(capsys, code, "0123456789abcdef", "ran out of steps")
    assert code == cli.EXIT_FAILED


# --------------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------------


def test_version_from_installed_metadata():
    assert gf.__version__ == importlib.metadata.version("gradflow")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert gf.__version__ == pyproject["project"]["version"]


def _imported_packages(folders) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    local = {"gradflow", "experiments", "helpers", "reference", "conftest", "_common", "tests", "benchmarks"}
    return {n for n in names - local if n not in sys.stdlib_module_names}


def _declared(requirements) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def test_every_imported_package_is_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _declared(pyproject["dependencies"])
    tests = runtime | _declared(pyproject["optional-dependencies"]["test"])
    dists = importlib.metadata.packages_distributions()

    def distributions(modules):
        return {d.lower().replace("_", "-") for m in modules for d in dists.get(m, [m])}

    assert distributions(_imported_packages(["gradflow", "experiments"])) - runtime == set()
    assert distributions(_imported_packages(["tests"])) - tests == set()


# --------------------------------------------------------------------------------------------------
# No surprises at import (issue 13.5)
# --------------------------------------------------------------------------------------------------

IMPORT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import gradflow
    import jax
    from jax._src import xla_bridge
    assert not xla_bridge._backends, f"a backend was initialised by import gradflow: {list(xla_bridge._backends)}"
    assert "matplotlib" not in sys.modules, "import gradflow imported matplotlib"
    # set after the import, and still in effect:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    jax.config.update("jax_platforms", "cpu")
    assert jax.numpy.zeros(1).dtype == jax.numpy.float64, "float64 is on by default"
    assert len(jax.devices()) == 3, jax.devices()
    assert gradflow.ChainTask.uniform(4).start_probs.dtype == jax.numpy.float64
    print("IMPORT_OK")
    """
)


def _run_python(script, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "MPLBACKEND")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environ)


def test_import_builds_no_arrays_and_initialises_no_backend():
    result = _run_python(IMPORT_SCRIPT)
    assert result.returncode == 0 and "IMPORT_OK" in result.stdout, result.stdout + result.stderr


MODULES_SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import matplotlib
    import gradflow
    from jax._src import xla_bridge
    names = sorted(m.name for m in pkgutil.iter_modules(gradflow.__path__, "gradflow.")
                   if m.name not in ("gradflow.cli",))
    for name in names:
        importlib.import_module(name)
        if xla_bridge._backends:
            sys.exit(f"importing {name} initialised a JAX backend (an array built at import time)")
    assert matplotlib.rcParams._get_backend_or_none() is None, "importing gradflow chose a matplotlib backend"
    print("MODULES_OK", len(names))
    """
)


def test_importing_any_module_builds_no_arrays_nor_chooses_a_plot_backend():
    result = _run_python(MODULES_SCRIPT)
    assert result.returncode == 0 and "MODULES_OK" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# A regular (non-editable) install in a fresh virtualenv
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_figures_from_a_regular_install(tmp_path):
    """Build a wheel, install it (no deps, no network) into a fresh venv that sees this venv's
    packages, and run `gradflow figures emergence --quick` from outside the source tree."""
    import site
    import venv

    try:
        from setuptools.command import bdist_wheel  # noqa: F401  (setuptools >= 70.1 builds wheels itself)
    except ImportError:
        pytest.importorskip("wheel", reason="building a wheel offline needs setuptools >= 70.1 or wheel")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("gradflow-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies come from this venv (a plain path entry: its editable gradflow is not loaded)
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:  # an older pip without --python: install into the target directly
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", purelib, str(wheel)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gradflow_bin = env_dir / "bin" / "gradflow"
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import gradflow, gradflow.cli as c; print(gradflow.__file__); "
            "print(gradflow.__version__); print(c.experiments_dir())",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    location, version, experiments = check.stdout.split()
    assert not Path(location).is_relative_to(ROOT) and not Path(experiments).is_relative_to(ROOT)
    assert version == gf.__version__
    command = [str(gradflow_bin)] if gradflow_bin.exists() else [str(python), "-m", "gradflow.cli"]
    listed = subprocess.run(command + ["figures", "--list"], capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert listed.returncode == 0 and listed.stdout.split() == cli.figure_names(), listed.stdout + listed.stderr
    out = elsewhere / "figs"
    run = subprocess.run(
        command + ["figures", "emergence", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert all((out / f"emergence.{ext}").stat().st_size > 0 for ext in ("png", "pdf", "json"))
    assert json.loads((out / "emergence.json").read_text())["final"]["reward"] > 0.99


def test_every_public_name_resolves():
    """Each name in gf.__all__ loads the gradflow object of that name: a submodule is gradflow.<name>."""
    for name in gf.__all__:
        value = getattr(gf, name)
        if isinstance(value, types.ModuleType):
            assert value.__name__ == f"gradflow.{name}", (name, value)
        else:
            assert value.__name__ == name and value.__module__.split(".")[0] == "gradflow", (name, value)
    assert gf.flow.FlowParams is gf.FlowParams and gf.sweep.__name__ == "gradflow.sweep"  # submodules load on use
    assert callable(gf.sweep.run_sweep)
    with pytest.raises(AttributeError):
        _ = gf.no_such_name


def test_theta0_takes_one_to_five_numbers_the_rest_zero():
    """--theta0 0.01 (one number) is alpha = 0.01 and zeros: eta and delta need not be typed."""
    args = cli.build_parser().parse_args(["simulate", "--out", "x", "--theta0", "0.01"])
    np.testing.assert_array_equal(cli._flow_from_args(args).theta0.as_array(), [0.01, 0.0, 0.0, 0.0, 0.0])
    args = cli.build_parser().parse_args(["simulate", "--out", "x", "--theta0", "0.3", "-0.1", "0.2", "1", "2"])
    np.testing.assert_array_equal(cli._flow_from_args(args).theta0.as_array(), [0.3, -0.1, 0.2, 1.0, 2.0])


# --------------------------------------------------------------------------------------------------
# The authors' setting: --max-len, --eval, train, examples in --help, design's renamed flag
# --------------------------------------------------------------------------------------------------


def _subcommands():
    return cli.build_parser()._subparsers._group_actions[0].choices


def test_every_help_shows_an_example():
    for name, parser in _subcommands().items():
        assert f"example:\n  gradflow {name}" in parser.format_help(), name


def test_max_len_allow_self_and_eval_reach_the_config():
    args = cli.build_parser().parse_args(
        [
            "simulate",
            "--out",
            "x",
            "--n",
            "5",
            "--allow-self",
            "--max-len",
            "6",
            "--eval",
            "hard=hardest",
            "--eval",
            "k=k_hardest:2",
        ]
    )
    params = cli._flow_from_args(args)
    assert params.model.max_len == 6 and not params.model.mask_self
    assert sorted(params.eval_tasks) == ["hard", "k"]
    np.testing.assert_array_equal(params.eval_tasks["k"].start_probs, [0.0, 0.0, 0.5, 0.5])
    for name in ("run", "check", "train", "design", "sweep"):
        flags = {flag for action in _subcommands()[name]._actions for flag in action.option_strings}
        assert "--max-len" in flags, name
        assert name == "design" or "--eval" in flags, name


@pytest.mark.slow
def test_simulate_prints_and_saves_eval_tasks(tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli.main(["simulate", *SMALL, "--eval", "hard=hardest", "--out", str(out)]) == 0
    assert "eval hard: reward =" in capsys.readouterr().out
    trajectory = gf.Trajectory.load(out.with_suffix(".npz"))
    assert sorted(trajectory.eval_reward) == ["hard"] and trajectory.eval_reward["hard"].shape == trajectory.reward.shape
    assert cli.main(["check", "--run", str(out.with_suffix(".npz"))]) == 0
    assert "eval hard learned" in capsys.readouterr().out


def test_train_the_authors_run(tmp_path, capsys):
    """The authors' simple-examples run, as the issue spells it (plus an eval task and an output path)."""
    out = tmp_path / "authors"
    argv = "train --n 5 --dist k_hardest --k 4 --allow-self --max-len 6 --optimizer adam --lr 0.01 --steps 300 --theta0 0"
    assert cli.main([*argv.split(), "--eval", "hard=hardest", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exact gradient, adam" in text and "acc|terminal" in text and "max_len = 6" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:2] in (["300", "train"], ["300", "hard"])]
    assert len(rows) == 2 and float(rows[0][2]) > 0.98 and float(rows[1][2]) > 0.95
    result = gf.training.TrainingTrajectory.load(out.with_suffix(".npz"))
    assert result.theta.shape == (301, 5) and result.config.model.max_len == 6
    assert set(result.eval_readouts["hard"]) == set(gf.training.EVAL_RECORDED)


def test_train_sampled(tmp_path, capsys):
    out = tmp_path / "sampled"
    argv = ["train", "--sampled", "--n", "4", "--steps", "3", "--batch", "4", "--seed", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "sampled REINFORCE, batch 4" in capsys.readouterr().out
    assert gf.training.TrainingTrajectory.load(out.with_suffix(".npz")).stats["batch"] == 4


def test_sweep_applies_max_len_and_eval_to_every_config(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(
        gf.sweep, "run_sweep", lambda path, out, **kwargs: seen.setdefault("configs", gf.sweep.read_configs(path))
    )
    configs = [gf.FlowParams(gf.ChainTask.uniform(n)) for n in (3, 4)]
    path = gf.sweep.write_configs(configs, tmp_path / "c.json")
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--max-len", "9", "--eval", "h=hardest"]) == 0
    assert [c.model.max_len for c in seen["configs"]] == [9, 9]
    assert [c.eval_tasks["h"].n for c in seen["configs"]] == [3, 4]


def test_design_old_mass_flag_is_a_deprecated_alias(capsys):
    args = cli.build_parser().parse_args(["design", "--mean-easy-mass", "0.1"])
    value, notice = cli._renamed_flag(args, "mean_easy_mass", "max_mean_easy_mass")
    assert value == 0.1 and notice.startswith("gradflow design: gradflow design --mean-easy-mass is deprecated")
    assert notice.endswith("use gradflow design --max-mean-easy-mass")
    assert "gradflow design --mean-easy-mass" in {alias.old for alias in gf._deprecated.ALIASES}
    args = cli.build_parser().parse_args(["design", "--max-mean-easy-mass", "0.2"])
    assert cli._renamed_flag(args, "mean_easy_mass", "max_mean_easy_mass") == (0.2, None)
    helps = {action.dest: action.help for action in _subcommands()["design"]._actions}
    assert "cap" not in helps["max_mean_easy_mass"] and "rollout cap" in helps["max_len"]  # "cap": the rollout cap only


def test_progress_meter_is_off_by_default(monkeypatch, tmp_path):
    """The CLI's default solve carries no host callback, so it is the cached program (issue 21)."""
    seen = []

    class Stop(Exception):
        pass

    def record(params, progress=False):
        seen.append(progress)
        raise Stop

    monkeypatch.setattr(gf.flow, "simulate", record)
    for argv, expected in ((["simulate"], False), (["simulate", "--progress"], True), (["simulate", "--no-progress"], False)):
        with pytest.raises(Stop):
            cli.main(argv + ["--out", str(tmp_path / "x")])
        assert seen.pop() is expected
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["simulate", "--out", "x", "--progress", "--no-progress"])
