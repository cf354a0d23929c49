"""Figure files kept by what drew them: a figure drawn once from the same data is copied, not drawn again.

A figure drawn by a pure function of its data (``plotting.draw_emergence`` of the data as its JSON file holds it) is
fixed by that data, the code that draws and writes it and the libraries that render it.  ``figure_key`` hashes them
all: the drawer's name and its module's source, the data (canonical JSON), the source of ``gradflow.plotting`` and
``gradflow.figure_files``, the versions of gradflow and of the libraries that draw and encode the files (matplotlib,
NumPy, Pillow, fontTools), the matplotlibrc matplotlib would read and ``SOURCE_DATE_EPOCH`` (the PDF's date), none of
them importing matplotlib.  ``restore`` copies the PNG and PDF kept under a key; ``keep`` stores them, each written to
a temporary name and renamed (``trajectory.atomic_write``), so no reader sees half a file.  A kept PDF carries the
date it was first drawn (unless ``SOURCE_DATE_EPOCH`` fixes it).

The folder is ``figures`` inside the compilation cache's (``compile_cache.enable_persistent_cache``):
``GRADFLOW_CACHE_DIR`` moves both and ``GRADFLOW_NO_CACHE=1`` turns both off.  It holds the ``KEPT_FIGURES`` most
recently used figures (a figure read is a use).  A warm ``gradflow run`` (the same config again) copies its figure:
it imports no matplotlib and draws nothing, which was most of its time (docs/guide/details.md, Performance).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from gradflow import compile_cache
from gradflow._version import __version__
from gradflow.trajectory import atomic_write

KEPT_FIGURES = 32  # figures the folder keeps (least recently used removed first)
IMAGE_FORMATS = ("png", "pdf")  # the files kept for each figure
DRAWING_MODULES = ("gradflow.plotting", "gradflow.figure_files")  # their source is part of every key
RENDERING_LIBRARIES = ("matplotlib", "numpy", "pillow", "fonttools")  # their versions too


def folder() -> Path | None:
    """The figure cache's folder (created), or None where the compilation cache is off or cannot be created."""
    root = compile_cache.enable_persistent_cache()
    if root is None:
        return None
    path = Path(root) / "figures"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def figure_key(draw: Callable, data: dict) -> str | None:
    """sha256 over what fixes a drawn figure's files: the drawer ``draw`` (its module and name, and the source of its
    module and of ``DRAWING_MODULES``), ``data`` (plain JSON values: ``plotting.plain``), gradflow's and
    ``RENDERING_LIBRARIES``' versions, the matplotlibrc and SOURCE_DATE_EPOCH.  None where the drawer's source file is
    unknown (defined in a notebook cell or at the prompt): such a figure is drawn every time."""
    source = getattr(sys.modules.get(draw.__module__), "__file__", None)
    if source is None or not os.path.isfile(source):
        return None
    digest = hashlib.sha256()
    name = f"{draw.__module__}.{draw.__qualname__}"
    for part in (name, json.dumps(data, sort_keys=True), __version__, os.environ.get("SOURCE_DATE_EPOCH", "")):
        digest.update(part.encode() + b"\0")
    for path in [importlib.util.find_spec(module).origin for module in DRAWING_MODULES] + [source]:
        digest.update(Path(path).read_bytes() + b"\0")
    for library in RENDERING_LIBRARIES:
        digest.update(_version_of(library).encode() + b"\0")
    rc_file = matplotlibrc()
    digest.update(rc_file.read_bytes() if rc_file is not None else b"default")
    return digest.hexdigest()


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def matplotlibrc() -> Path | None:
    """The user's matplotlibrc that matplotlib would read, found as matplotlib finds it (the current folder, then
    $MATPLOTLIBRC (a file, or a folder holding one), then $MPLCONFIGDIR, else $XDG_CONFIG_HOME/matplotlib or
    ~/.config/matplotlib); None: matplotlib's own defaults."""
    try:
        candidates = [Path.cwd() / "matplotlibrc"]
    except OSError:  # the current folder was removed: matplotlib cannot read one there either
        candidates = []
    if os.environ.get("MATPLOTLIBRC"):
        given = Path(os.environ["MATPLOTLIBRC"])
        candidates += [given, given / "matplotlibrc"]
    config = os.environ.get("MPLCONFIGDIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "matplotlib"
    )
    candidates.append(Path(config) / "matplotlibrc")
    return next((path for path in candidates if path.is_file()), None)


def _kept(key: str, cache: Path) -> dict[str, Path]:
    return {ext: cache / f"{key}.{ext}" for ext in IMAGE_FORMATS}


def restore(key: str, paths: dict[str, Path]) -> bool:
    """Copy the files kept under ``key`` to ``paths`` (by format: "png", "pdf"); False (nothing written) where the
    cache is off or does not hold them all."""
    cache = folder()
    if cache is None:
        return False
    kept = _kept(key, cache)
    if not all(path.is_file() for path in kept.values()):
        return False
    try:
        for ext, path in kept.items():
            _copy_whole(path, paths[ext])
            os.utime(path)  # a use: the least recently used figures leave first
    except OSError:  # removed by a concurrent pruning between the check and the copy: draw it
        return False
    return True


def keep(key: str, paths: dict[str, Path]) -> None:
    """Store the files ``paths`` (by format) under ``key`` and drop the least recently used figures past
    ``KEPT_FIGURES``; a cache that is off or cannot be written is left alone."""
    cache = folder()
    if cache is None:
        return
    try:
        for ext, path in _kept(key, cache).items():
            _copy_whole(paths[ext], path)
        _prune(cache)
    except OSError:
        pass


def _copy_whole(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file renamed over it (``trajectory.atomic_write``)."""
    with open(source, "rb") as original:
        atomic_write(target, lambda copy: shutil.copyfileobj(original, copy))


def _prune(cache: Path) -> None:
    """Remove the least recently used figures beyond ``KEPT_FIGURES`` (a figure's age: its PNG's time)."""
    figures = sorted(cache.glob("*.png"), key=lambda path: path.stat().st_mtime, reverse=True)
    for png in figures[KEPT_FIGURES:]:
        for ext in IMAGE_FORMATS:
            png.with_suffix(f".{ext}").unlink(missing_ok=True)
