"""The figure cache (gradflow.figure_cache, plotting.save_drawn): a figure drawn once from the same data is copied,
byte for byte, and a process that copies it imports no matplotlib; anything that could change the files draws again."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

from gradflow import compile_cache, figure_cache, plotting


def draw_line(data):
    """A small drawer of this module (its source file is known: the figure cache keeps its figures)."""
    fig, axes = plotting.subplots()
    axes[0, 0].plot(data["y"])
    return fig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The figure cache in a folder of its own; yields the folder and counts the drawings."""
    folder = tmp_path / "figures"
    folder.mkdir()
    monkeypatch.setattr(figure_cache, "folder", lambda: folder)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    return folder


def counted(draw, calls):
    def drawer(data):
        calls.append(data)
        return draw(data)

    drawer.__module__, drawer.__qualname__ = draw.__module__, draw.__qualname__
    return drawer


def image_bytes(paths):
    return {ext: paths[ext].read_bytes() for ext in ("png", "pdf")}


def test_a_figure_of_the_same_data_is_copied_not_drawn(cache, tmp_path):
    calls = []
    first = plotting.save_drawn(counted(draw_line, calls), {"y": [1, 3, 2]}, "fig", tmp_path / "a")
    again = plotting.save_drawn(counted(draw_line, calls), {"y": [1, 3, 2]}, "fig", tmp_path / "b")
    assert len(calls) == 1
    assert image_bytes(again) == image_bytes(first)
    assert again["json"].read_text() == first["json"].read_text()
    assert len(list(cache.glob("*.png"))) == len(list(cache.glob("*.pdf"))) == 1
    other = plotting.save_drawn(counted(draw_line, calls), {"y": [1, 3, 2.5]}, "fig", tmp_path / "c")
    assert len(calls) == 2 and other["png"].read_bytes() != first["png"].read_bytes()


def test_a_copied_figure_equals_the_one_drawn_without_the_cache(cache, tmp_path, monkeypatch):
    data = {"y": [0.5, 1.5, 1.0, 2.0]}
    plotting.save_drawn(draw_line, data, "fig", tmp_path / "kept")
    copied = plotting.save_drawn(draw_line, data, "fig", tmp_path / "copied")
    monkeypatch.setattr(figure_cache, "folder", lambda: None)  # the cache off: drawn every time
    calls = []
    drawn = plotting.save_drawn(counted(draw_line, calls), data, "fig", tmp_path / "drawn")
    assert len(calls) == 1 and image_bytes(copied) == image_bytes(drawn)


def test_an_incomplete_entry_is_drawn_again_and_kept_whole(cache, tmp_path):
    calls = []
    plotting.save_drawn(counted(draw_line, calls), {"y": [1, 2]}, "fig", tmp_path / "a")
    (pdf,) = cache.glob("*.pdf")
    pdf.unlink()
    plotting.save_drawn(counted(draw_line, calls), {"y": [1, 2]}, "fig", tmp_path / "b")
    assert len(calls) == 2 and pdf.is_file()


def test_the_key_follows_what_changes_the_files(monkeypatch):
    key = figure_cache.figure_key(draw_line, {"y": [1, 2]})
    assert key == figure_cache.figure_key(draw_line, {"y": [1, 2]})
    assert key != figure_cache.figure_key(draw_line, {"y": [1, 2.000000001]})
    assert key != figure_cache.figure_key(plotting.draw_emergence, {"y": [1, 2]})
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "12345")
    assert key != figure_cache.figure_key(draw_line, {"y": [1, 2]})
    monkeypatch.setattr(figure_cache, "_version_of", lambda name: "9.9" if name == "matplotlib" else "1")
    assert figure_cache.figure_key(draw_line, {"y": [1, 2]}) != key


def test_the_key_reads_the_matplotlibrc_matplotlib_would_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "config"))
    monkeypatch.delenv("MATPLOTLIBRC", raising=False)
    assert figure_cache.matplotlibrc() is None
    before = figure_cache.figure_key(draw_line, {"y": [1]})
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "matplotlibrc").write_text("lines.linewidth: 3\n")
    assert figure_cache.matplotlibrc() == tmp_path / "config" / "matplotlibrc"
    assert figure_cache.figure_key(draw_line, {"y": [1]}) != before
    (tmp_path / "matplotlibrc").write_text("lines.linewidth: 4\n")  # the current folder's comes first
    assert figure_cache.matplotlibrc() == tmp_path / "matplotlibrc"


def test_a_drawer_without_a_source_file_is_drawn_every_time(cache, tmp_path, monkeypatch):
    calls = []
    drawer = counted(draw_line, calls)
    monkeypatch.setitem(sys.modules, "notebook_cell", types.ModuleType("notebook_cell"))  # a module without a file,
    drawer.__module__ = "notebook_cell"  # as a notebook's __main__: no file holds the drawer's code
    assert figure_cache.figure_key(drawer, {"y": [1]}) is None
    for folder in ("a", "b"):
        plotting.save_drawn(drawer, {"y": [1]}, "fig", tmp_path / folder)
    assert len(calls) == 2 and not list(cache.iterdir())


def test_the_least_recently_used_figures_leave_first(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(figure_cache, "KEPT_FIGURES", 2)
    source = {ext: tmp_path / f"source.{ext}" for ext in ("png", "pdf")}
    for path in source.values():
        path.write_bytes(b"x")
    for age, key in enumerate(("old", "middle")):
        figure_cache.keep(key, source)
        for ext in ("png", "pdf"):
            os.utime(cache / f"{key}.{ext}", (1000 + age, 1000 + age))
    assert figure_cache.restore("old", {ext: tmp_path / f"out.{ext}" for ext in ("png", "pdf")})  # a use: now newest
    figure_cache.keep("new", source)
    assert sorted(path.stem for path in cache.glob("*.png")) == ["new", "old"]
    assert sorted(path.stem for path in cache.glob("*.pdf")) == ["new", "old"]


def test_the_cache_lives_in_the_compilation_caches_folder_and_is_off_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "enable_persistent_cache", lambda: str(tmp_path / "jax"))
    assert figure_cache.folder() == tmp_path / "jax" / "figures" and figure_cache.folder().is_dir()
    monkeypatch.setattr(compile_cache, "enable_persistent_cache", lambda: None)
    assert figure_cache.folder() is None
    assert not figure_cache.restore("any", {"png": tmp_path / "x.png", "pdf": tmp_path / "x.pdf"})


WARM_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gradflow import plotting

    def draw_bars(data):
        fig, axes = plotting.subplots()
        axes[0, 0].bar(range(len(data["y"])), data["y"])
        return fig

    paths = plotting.save_drawn(draw_bars, {"y": [3, 1, 2]}, "bars", Path(sys.argv[1]))
    print("MATPLOTLIB", "matplotlib" in sys.modules)
    """
)


def test_a_second_process_copies_the_figure_and_imports_no_matplotlib(tmp_path):
    script = tmp_path / "draw_bars.py"
    script.write_text(WARM_SCRIPT)
    env = {**os.environ, "GRADFLOW_CACHE_DIR": str(tmp_path / "cache"), "SOURCE_DATE_EPOCH": "0"}
    env.pop("GRADFLOW_NO_CACHE", None)
    cold, warm = (
        subprocess.run([sys.executable, str(script), str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=300)
        for out in ("cold", "warm")
    )
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr[-2000:] + warm.stderr[-2000:]
    assert "MATPLOTLIB True" in cold.stdout and "MATPLOTLIB False" in warm.stdout, (cold.stdout, warm.stdout)
    for ext in ("png", "pdf", "json"):
        assert (tmp_path / "warm" / f"bars.{ext}").read_bytes() == (tmp_path / "cold" / f"bars.{ext}").read_bytes(), ext
