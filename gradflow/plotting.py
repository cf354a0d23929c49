"""One figure style for every experiment, the shared figure drawers and a png + pdf + json writer.

Palette: Okabe-Ito (colour-blind safe).  Times are flow times t; gradient descent and sampled training
sit on the same axis at t = lr * step.  ``save_figure`` writes ``<out>/<name>.png`` (README),
``.pdf`` (papers) and ``.json`` (the numbers behind the figure).  ``experiment_parser`` gives each
script in ``experiments/`` the same ``--quick`` / ``--out`` options, and ``run_experiment`` runs its
three parts: a computation on the mode's preset that returns plain data, the claim checks on that data
and the plot of it (both on the data as the JSON holds it, so either can be redone from the file).
The levels marked on the shared figures are the ones ``gradflow.theory.phases`` defines.

Importing this module does not import matplotlib (``gradflow._imports``: the first figure drawn does) nor choose a
backend: the figure scripts and the CLI do (``use_headless_backend()``), so a user's interactive session keeps its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gradflow import figure_cache, theory
from gradflow._imports import matplotlib, plt  # stand-ins: matplotlib is imported when a figure is first drawn
from gradflow._series import first_crossings
from gradflow.figure_files import write_png_and_pdf

OKABE_ITO = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
PARAM_COLORS = {"alpha": OKABE_ITO[0], "beta": OKABE_ITO[1], "gamma": OKABE_ITO[2]}
PARAM_SYMBOLS = {"alpha": r"$\alpha$ (outgoing edge)", "beta": r"$\beta$ (incoming edge)", "gamma": r"$\gamma$ (far edge)"}
TIME_LABEL = "flow time t (units of lr × steps)"
SEQUENTIAL_CMAP = "viridis"
DEFAULT_OUT = Path("figures")
_PHASE_LEVELS = inspect.signature(theory.phases).parameters
EMERGENCE_LEVEL = _PHASE_LEVELS["emergence_level"].default  # P(forward | move) every position reaches at emergence
TRAVERSAL_LEVEL = _PHASE_LEVELS["traversal_level"].default  # ... and at traversal

STYLE = {
    "axes.prop_cycle": f"cycler(color={list(OKABE_ITO)!r})",  # parsed by rcParams (no matplotlib import here)
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "lines.linewidth": 1.8,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}


def use_headless_backend() -> None:
    """Switch matplotlib to the non-interactive Agg backend (figure scripts and the CLI call this)."""
    matplotlib.use("Agg")


def use_style() -> None:
    """Apply the gradflow style to matplotlib's global rcParams."""
    plt.rcParams.update(STYLE)


def color(k: int) -> str:
    """The k-th palette colour (cycled)."""
    return OKABE_ITO[k % len(OKABE_ITO)]


def subplots(nrows: int = 1, ncols: int = 1, width: float = 4.2, height: float = 3.4, **kwargs):
    """``plt.subplots`` in the gradflow style, ``width`` x ``height`` inches per panel.

    Args:
        nrows: the number of panel rows.
        ncols: the number of panel columns.
        width: the width of one panel in inches.
        height: the height of one panel in inches.
        **kwargs: passed to ``plt.subplots`` (defaults: squeeze=False, constrained_layout=True).

    Returns:
        figure (tuple[matplotlib.figure.Figure, np.ndarray]): the figure and its axes (a 2-d array unless
            ``squeeze`` is given).
    """
    use_style()
    kwargs.setdefault("squeeze", False)
    kwargs.setdefault("constrained_layout", True)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kwargs)


def panel_label(ax, letter: str) -> None:
    """A bold (a), (b), ... in the top-left corner of a panel.

    Args:
        ax (matplotlib.axes.Axes): the panel.
        letter: the label's letter, written as (letter).
    """
    ax.text(-0.02, 1.02, f"({letter})", transform=ax.transAxes, fontweight="bold", ha="right", va="bottom")


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def to_jsonable(obj):
    """Arrays -> lists, numpy scalars -> Python numbers, NaN/inf -> None, recursively."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def save_figure(fig, name: str, out_dir: str | Path = DEFAULT_OUT, data: dict | None = None) -> dict[str, Path]:
    """Write ``out_dir/name``.png and .pdf (one layout, side by side: ``gradflow.figure_files``) and .json
    (``data``, NaN/inf as null); close ``fig``.

    Args:
        fig (matplotlib.figure.Figure): the figure to write and close.
        name: the file stem.
        out_dir: the output directory (created if missing).
        data: the figure's data for the .json file (``to_jsonable``); None: an empty object.

    Returns:
        The written paths by extension ("png", "pdf", "json").
    """
    paths = _figure_paths(name, out_dir)
    write_png_and_pdf(fig, paths["png"], paths["pdf"])
    plt.close(fig)
    return _with_json(paths, data)


def save_drawn(draw: Callable[[dict], object], data: dict, name: str, out_dir: str | Path = DEFAULT_OUT) -> dict[str, Path]:
    """``save_figure(draw(plain(data)), name, out_dir, data)``, the PNG and PDF copied from the figure cache where
    it holds this drawer's figure of this data (``gradflow.figure_cache``: nothing drawn, matplotlib not imported),
    and kept there once drawn (a drawer without a source file, e.g. from a notebook cell, is drawn every time).

    Args:
        draw: data as its JSON file holds it -> the matplotlib figure (a pure function of the data).
        data: the figure's data (written to the .json file).
        name: the file stem.
        out_dir: the output directory (created if missing).

    Returns:
        The written paths by extension ("png", "pdf", "json").
    """
    data = plain(data)
    paths = _figure_paths(name, out_dir)
    key = figure_cache.figure_key(draw, data)
    if key is not None and figure_cache.restore(key, paths):
        return _with_json(paths, data)
    use_headless_backend()
    save_figure(draw(data), name, out_dir, data)
    if key is not None:
        figure_cache.keep(key, paths)
    return paths


def _figure_paths(name: str, out_dir: str | Path) -> dict[str, Path]:
    """``out_dir/name``.png, .pdf and .json by extension (the folder created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {ext: out_dir / f"{name}.{ext}" for ext in ("png", "pdf", "json")}


def _with_json(paths: dict[str, Path], data: dict | None) -> dict[str, Path]:
    """Write ``data`` (``to_jsonable``) to the .json path, report every path written and return them."""
    paths["json"].write_text(json.dumps(to_jsonable(data or {}), indent=1) + "\n")
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def experiment_parser(description: str) -> argparse.ArgumentParser:
    """The options every experiment script shares: --quick (seconds, tests) and --out DIR."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced version that runs in seconds (used by the tests)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory for NAME.png/.pdf/.json (default figures/)")
    return parser


def choose_preset(args: argparse.Namespace, quick, full):
    """The preset of the run's mode (``quick`` with --quick, else ``full``), each option given on the
    command line (an attribute of ``args`` named as a preset field, not None) replacing that field.

    Args:
        args: the parsed options (``experiment_parser`` and the script's own).
        quick: the quick preset (a frozen dataclass).
        full: the full preset, of the same class.

    Returns:
        The preset to run.
    """
    base = quick if args.quick else full
    given = {}
    for field in dataclasses.fields(base):
        value = getattr(args, field.name, None)
        if value is not None:
            given[field.name] = tuple(value) if isinstance(getattr(base, field.name), tuple) else value
    return dataclasses.replace(base, **given)


def plain(data: dict) -> dict:
    """``data`` as its JSON file holds it (``to_jsonable``, read back): the claim checks and the plot see this."""
    return json.loads(json.dumps(to_jsonable(data)))


def claim_failures(conditions: dict[str, bool]) -> list[str]:
    """The claims (statement -> whether it holds) that fail, in order; empty when all hold."""
    return [statement for statement, holds in conditions.items() if not bool(holds)]


def run_experiment(
    name: str,
    args: argparse.Namespace,
    quick,
    full,
    compute: Callable[[object], dict],
    check: Callable[[dict], list[str]],
    draw: Callable[[dict, object], object],
) -> dict:
    """One figure script's run: preset, computation, claim checks, plot, files.

    Selects the headless backend, runs ``compute`` on the mode's preset (``choose_preset``), records the
    preset (under "preset", with "mode") and the claim checks' result (under "claim": "failures", the
    failed statements, and "holds"), draws the data as the JSON holds it and writes png + pdf + json.

    Args:
        name: the figure's file stem.
        args: the parsed options (--quick, --out and the preset fields the script exposes).
        quick: the quick preset.
        full: the full preset.
        compute: preset -> plain data (dicts, lists, arrays, numbers).
        check: data -> the failed claim statements (``claim_failures``).
        draw: (data, preset) -> the matplotlib figure.

    Returns:
        The data written to the JSON.
    """
    use_headless_backend()
    preset = choose_preset(args, quick, full)
    data = plain(compute(preset))
    data["preset"] = {"mode": "quick" if args.quick else "full", **to_jsonable(dataclasses.asdict(preset))}
    failures = check(data)
    data["claim"] = {**data.get("claim", {}), "failures": failures, "holds": not failures}
    print(f"{name}: claim {'holds' if not failures else 'FAILS: ' + '; '.join(failures)}")
    save_figure(draw(data, preset), name, args.out, data)
    return data


def log_times(t_max: float, num: int = 200, t_min: float | None = None) -> np.ndarray:
    """0 followed by ``num`` log-spaced save times from ``t_min`` (default t_max * 1e-4) to ``t_max``.

    Args:
        t_max: the last save time.
        num: the number of log-spaced times after 0.
        t_min: the first positive save time; None: t_max * 1e-4.

    Returns:
        The num + 1 save times, starting at 0.
    """
    t_min = t_max * 1e-4 if t_min is None else t_min
    return np.concatenate([[0.0], np.geomspace(t_min, t_max, num)])


# --------------------------------------------------------------------------------------------------
# Shared drawers
# --------------------------------------------------------------------------------------------------


def _positive(ts: np.ndarray, *arrays):
    """Drop t <= 0 and NaN saves (log time axes)."""
    keep = (ts > 0) & np.isfinite(ts)
    for a in arrays:
        keep &= np.all(np.isfinite(np.reshape(a, (a.shape[0], -1))), axis=1)
    return (ts[keep],) + tuple(a[keep] for a in arrays)


def emergence_data(trajectory) -> dict:
    """The numbers of the emergence figure of one flow (the positive, finite saves) and a few read-outs.

    Each position's first time at the emergence and traversal levels of ``gradflow.theory.phases``
    (``EMERGENCE_LEVEL``, ``TRAVERSAL_LEVEL``; P(forward | move), interpolated in log t) is included.
    """
    ts, theta, reward, fwd, length, trav = _positive(
        np.asarray(trajectory.ts),
        np.asarray(trajectory.theta),
        np.asarray(trajectory.reward),
        np.asarray(trajectory.forward_prob),
        np.asarray(trajectory.expected_length),
        np.asarray(trajectory.traversal_prob),
    )
    return {
        "config": trajectory.config.to_dict(),
        "ts": ts,
        "theta": theta[:, :3],
        "reward": reward,
        "loss": 1.0 - reward,
        "forward_prob": fwd,
        "traversal_prob": trav,
        "expected_length": length,
        "minimal_length": trajectory.minimal_length,
        "events": trajectory.events,
        "levels": {"emergence": EMERGENCE_LEVEL, "traversal": TRAVERSAL_LEVEL},
        "t_emergence_by_position": first_crossings(ts, fwd, EMERGENCE_LEVEL, log_time=True),
        "t_traversal_by_position": first_crossings(ts, fwd, TRAVERSAL_LEVEL, log_time=True),
        "final": {
            "t": ts[-1],
            "alpha_beta_gamma": theta[-1, :3],
            "reward": reward[-1],
            "forward_prob": fwd[-1],
            "expected_length": length[-1],
        },
    }


def draw_emergence(data: dict):
    """The four-panel emergence figure of ``emergence_data`` (as its JSON holds it).

    (a) alpha, beta, gamma against log t; (b) reward J and loss 1 - J (log); (c) P(forward | move)
    per position of chain a (heatmap over position x log t) with each position's emergence and
    traversal times; (d) expected chain-of-thought length against the minimal one.
    """
    config = data["config"]
    n = config["task"]["n"]
    ts, theta, reward = (np.asarray(data[k], dtype=float) for k in ("ts", "theta", "reward"))
    fwd, length, trav = (np.asarray(data[k], dtype=float) for k in ("forward_prob", "expected_length", "traversal_prob"))
    levels = data["levels"]
    fig, axes = subplots(2, 2, width=5.0, height=3.6)
    (ax_theta, ax_reward), (ax_heat, ax_len) = axes

    for k, name in enumerate(("alpha", "beta", "gamma")):
        ax_theta.plot(ts, theta[:, k], color=PARAM_COLORS[name], label=PARAM_SYMBOLS[name])
    ax_theta.set(xscale="log", xlabel=TIME_LABEL, ylabel="attention score", title="parameters")
    ax_theta.legend(loc="best")

    ax_reward.plot(ts, reward, color=color(0), label="reward J")
    ax_reward.plot(ts, trav, color=color(2), ls="-.", label="exact traversal prob.")
    ax_reward.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J", title="reward and loss", ylim=(0, 1.02))
    ax_loss = ax_reward.twinx()
    ax_loss.plot(ts, 1.0 - reward, color=color(1), ls="--", label="loss 1 − J (right, log)")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss 1 − J", color=color(1))
    ax_loss.tick_params(axis="y", colors=color(1))
    ax_loss.grid(False)
    ax_loss.spines["right"].set_visible(True)
    handles = ax_reward.get_legend_handles_labels()
    extra = ax_loss.get_legend_handles_labels()
    ax_reward.legend(handles[0] + extra[0], handles[1] + extra[1], loc="lower left", bbox_to_anchor=(0.0, 0.1))

    positions = np.arange(1, n)
    edges_t = np.sqrt(ts[1:] * ts[:-1])
    t_edges = np.concatenate([[ts[0] ** 2 / edges_t[0]], edges_t, [ts[-1] ** 2 / edges_t[-1]]])
    mesh = ax_heat.pcolormesh(t_edges, np.arange(0.5, n), fwd.T, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0, shading="flat")
    for key, marker, level in (("t_emergence_by_position", "o", "emergence"), ("t_traversal_by_position", "x", "traversal")):
        times = np.asarray(data[key], dtype=float)
        ax_heat.plot(times, positions, color="white", marker=marker, ms=3, lw=1, label=f"{level}: P ≥ {levels[level]:g}")
    ax_heat.set(
        xscale="log",
        xlabel=TIME_LABEL,
        ylabel=f"position i of $a_i$ ($a_{{{n}}}$ = terminal)",
        title="P(forward | move) per position\n"
        f"(white: first t with P ≥ {levels['emergence']:g} (o) and ≥ {levels['traversal']:g} (x))",
    )
    ax_heat.set_yticks(positions)
    ax_heat.grid(False)
    fig.colorbar(mesh, ax=ax_heat, label=r"P($a_i \to a_{i+1}$ | move)")

    minimal = data["minimal_length"]
    ax_len.plot(ts, length, color=color(0), label="expected length")
    ax_len.axhline(minimal, color="k", ls="--", lw=1, label=f"minimal (forward traversal) = {minimal:.2f}")
    ax_len.set(xscale="log", xlabel=TIME_LABEL, ylabel="generated tokens until a terminal", title="chain-of-thought length")
    ax_len.legend(loc="best")
    for ax, letter in zip(axes.flat, "abcd"):
        panel_label(ax, letter)
    model = config["model"]
    fig.suptitle(
        f"Emergence of forward traversal: n = {n}, {describe_start_probs(config['task']['start_probs'])}, "
        f"{model['attention']} attention, τ = {float(model['tau']):g}, θ0 = {format_theta(config['theta0'])}"
    )
    return fig


def emergence_figure(trajectory):
    """The four-panel emergence figure of one flow; returns (fig, data) (``emergence_data``, ``draw_emergence``)."""
    data = emergence_data(trajectory)
    return draw_emergence(plain(data)), data


def format_theta(theta) -> str:
    """(alpha, beta, gamma) of a theta array or list, for titles: '(0.3, 0, 0)'."""
    return "(" + ", ".join(f"{float(x):g}" for x in list(theta)[:3]) + ")"


def describe_start_probs(probs) -> str:
    """'uniform starts', 'hardest start only' or the start distribution, for titles."""
    probs = np.asarray(probs, dtype=float)
    if np.allclose(probs, probs[0]):
        return "uniform starts"
    if probs[-1] == 1.0:
        return "hardest start only"
    return "P(d) = " + ", ".join(f"{p:.3g}" for p in probs)
