"""A figure's PNG and PDF written side by side (``gradflow.figure_files``): the same bytes as one after the other,
and a writer that fails or hangs is replaced by the calling process."""

import os
import time

import matplotlib
import numpy as np
import pytest

from gradflow import figure_files, plotting

matplotlib.use("Agg")


def small_figure():
    """Two panels with what the shared figures hold: constrained layout, log axes, mathtext, bold text."""
    fig, axes = plotting.subplots(1, 2, width=3.0, height=2.4)
    ts = np.geomspace(1e-2, 1e4, 50)
    axes[0, 0].plot(ts, np.tanh(np.log(ts)), label=r"$\alpha$ (outgoing edge)")
    axes[0, 0].set(xscale="log", xlabel="flow time t", ylabel=r"$a_i \to a_{i+1}$")
    axes[0, 0].legend()
    axes[0, 1].plot(ts, 1.0 / ts)
    axes[0, 1].set(xscale="log", yscale="log", title="loss 1 − J")
    plotting.panel_label(axes[0, 0], "a")
    fig.suptitle("θ0 = (0.3, 0, 0)")
    return fig


def recorded_saves(fig, parent: int, child_action=None) -> list[str]:
    """Route ``fig.savefig`` through a recorder: the paths this process saved (in order); in a forked child,
    ``child_action()`` runs first."""
    saved, save = [], fig.savefig

    def savefig(path, *args, **kwargs):
        if os.getpid() != parent and child_action is not None:
            child_action()
        saved.append(os.path.basename(path))
        return save(path, *args, **kwargs)

    fig.savefig = savefig
    return saved


def write(folder, forked: bool, monkeypatch, child_action=None) -> list[str]:
    """``write_png_and_pdf`` of ``small_figure()`` into folder/f.png and f.pdf; the paths this process saved."""
    monkeypatch.setattr(figure_files, "forks_writers", lambda: forked)
    fig = small_figure()
    saved = recorded_saves(fig, os.getpid(), child_action)
    figure_files.write_png_and_pdf(fig, folder / "f.png", folder / "f.pdf")
    return saved


def file_bytes(folder) -> tuple[bytes, bytes]:
    return (folder / "f.png").read_bytes(), (folder / "f.pdf").read_bytes()


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[bytes, bytes]:
    """The two files written one after the other in this process (the PDF's creation date fixed)."""
    folder = tmp_path_factory.mktemp("serial")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", "0")
        assert write(folder, False, patch) == ["f.png", "f.pdf"]
    return file_bytes(folder)


@pytest.fixture
def fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # the PDF's creation date, so that files compare byte for byte


forking = pytest.mark.skipif(not figure_files.forks_writers(), reason="the PDF is forked off only on Linux")


@forking
def test_the_forked_pdf_and_the_png_equal_the_files_written_one_after_the_other(serial, tmp_path, fixed_date, monkeypatch):
    assert write(tmp_path, True, monkeypatch) == ["f.png"]  # the PDF came from the child
    assert file_bytes(tmp_path) == serial
    assert serial[1].startswith(b"%PDF")
    fig = small_figure()  # what save_figure did before: the PNG's layout kept for the PDF
    fig.savefig(tmp_path / "f.png")
    fig.set_layout_engine("none")
    fig.savefig(tmp_path / "f.pdf")
    assert file_bytes(tmp_path) == serial


def fail():
    raise RuntimeError("the writer fails")


@forking
@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_a_writer_that_fails_or_hangs_is_replaced_by_this_process(serial, tmp_path, fixed_date, monkeypatch, how):
    monkeypatch.setattr(figure_files, "WRITER_TIMEOUT", 0.2)
    child_action = fail if how == "fails" else lambda: time.sleep(60)
    assert write(tmp_path, True, monkeypatch, child_action) == ["f.png", "f.pdf"]
    assert file_bytes(tmp_path) == serial


@pytest.mark.parametrize("forked", [True, False])
def test_an_unwritable_pdf_raises_here(tmp_path, monkeypatch, forked):
    monkeypatch.setattr(figure_files, "forks_writers", lambda: forked and hasattr(os, "fork"))
    (tmp_path / "f.pdf").mkdir()  # a folder where the PDF should go
    with pytest.raises(OSError):
        figure_files.write_png_and_pdf(small_figure(), tmp_path / "f.png", tmp_path / "f.pdf")
    assert (tmp_path / "f.png").is_file()


def test_an_unwritable_png_raises_after_the_pdf_writer_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(figure_files, "forks_writers", lambda: hasattr(os, "fork"))
    (tmp_path / "f.png").mkdir()
    with pytest.raises(OSError):
        figure_files.write_png_and_pdf(small_figure(), tmp_path / "f.png", tmp_path / "f.pdf")
    if hasattr(os, "fork"):  # the child was waited for: its PDF is whole
        assert (tmp_path / "f.pdf").read_bytes().rstrip().endswith(b"%%EOF")


def test_forks_only_on_linux_outside_a_jupyter_kernel(monkeypatch):
    monkeypatch.setattr(figure_files.sys, "platform", "linux")
    monkeypatch.delitem(figure_files.sys.modules, "ipykernel", raising=False)
    assert figure_files.forks_writers() == hasattr(os, "fork")
    monkeypatch.setitem(figure_files.sys.modules, "ipykernel", object())
    assert not figure_files.forks_writers()
    monkeypatch.delitem(figure_files.sys.modules, "ipykernel")
    monkeypatch.setattr(figure_files.sys, "platform", "darwin")
    assert not figure_files.forks_writers()
