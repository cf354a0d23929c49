"""A figure's PNG and PDF, written side by side: one layout, two files, two processes where that is safe.

A figure's two image files each cost full draws of every artist (the PDF a font subset on top), one after the
other on one core.  ``write_png_and_pdf`` fixes the layout once (``fix_layout``: the
layout engine runs at the PNG's resolution, as the PNG save would run it, and is then switched off, so both
files hold the same layout) and writes the PDF in a forked child process while this process writes the PNG.
The files equal those written one after the other, byte for byte.

The child is forked only where that is safe and pays (``forks_writers``): on Linux, outside a Jupyter kernel
(whose output streams run on threads a child does not have).  A child that fails, or runs past
``WRITER_TIMEOUT`` seconds after the PNG is written (a lock some thread held at the fork), is given up and the
PDF is written here, so its error, if any, is raised here with its own message.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from pathlib import Path

from gradflow._imports import matplotlib

WRITER_TIMEOUT = 120.0  # seconds the PDF child may take after the PNG is written, before it is given up
_POLL_SECONDS = 0.005


def fix_layout(fig) -> None:
    """Run ``fig``'s layout engine once, at the resolution the PNG is saved at (rcParams "savefig.dpi"), and
    switch it off: every file saved afterwards holds this layout (what saving the PNG first did)."""
    dpi = fig.dpi
    fig.set_dpi(matplotlib.rcParams["savefig.dpi"])
    try:
        fig.draw_without_rendering()
    finally:
        fig.set_dpi(dpi)
    fig.set_layout_engine("none")


def forks_writers() -> bool:
    """Whether ``write_png_and_pdf`` writes the PDF in a forked child: on Linux, outside a Jupyter kernel."""
    return sys.platform == "linux" and hasattr(os, "fork") and "ipykernel" not in sys.modules


def write_png_and_pdf(fig, png: Path, pdf: Path) -> None:
    """Save ``fig`` to ``png`` and ``pdf`` with one layout (``fix_layout``), the PDF in a forked child where
    ``forks_writers()``; raises what saving raises."""
    fix_layout(fig)
    child = _fork_pdf_writer(fig, pdf) if forks_writers() else None
    try:
        fig.savefig(png)
    finally:  # the child is waited for even when the PNG fails (no writer left behind)
        written = child is not None and _finished_cleanly(child)
    if not written:
        fig.savefig(pdf)


def _fork_pdf_writer(fig, pdf: Path) -> int:
    """Fork a child that saves ``fig`` to ``pdf`` and exits (status 0 when written); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():  # jax warns at every fork; the child never runs JAX code
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        fig.savefig(pdf)
        status = 0
    finally:
        os._exit(status)  # no atexit handlers, no flush of buffers inherited from the parent


def _finished_cleanly(pid: int) -> bool:
    """Wait for the writer ``pid``: True when it exited with status 0; False when it failed, or ran past
    ``WRITER_TIMEOUT`` (then it is killed)."""
    deadline = time.monotonic() + WRITER_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(_POLL_SECONDS)
