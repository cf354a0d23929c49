"""The import graph matches the README's layering sentence: each module imports only from modules to its left.

Also: gradflow imports sit at module top (no import inside a function or class), and no module
reaches into another gradflow module's private names.  Pure text (ast), no JAX.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradflow"
LAYERING_LINE = re.compile(r"^Layering \(.*\):\s*(.*)$")


@functools.cache
def readme_layers() -> list[str]:
    """The module order stated in README.md's layering line (backticked names, left to right)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        match = LAYERING_LINE.match(line)
        if match:
            return list(re.findall(r"`([\w.]+)`", match.group(1)))
    raise AssertionError("README.md has no 'Layering (...):' line")


@functools.cache
def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def gradflow_imports(tree: ast.Module):
    """(module imported, names imported, the import node, whether it sits at module top) for each gradflow import."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradflow":
            if node.module == "gradflow":
                for alias in node.names:
                    yield alias.name, (), node, id(node) in top
            else:
                yield node.module.split(".")[1], tuple(a.name for a in node.names), node, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gradflow":
                    yield (parts[1] if len(parts) > 1 else "gradflow"), (), node, id(node) in top


def test_readme_lists_every_module_once():
    layers = readme_layers()
    assert len(layers) == len(set(layers)), "a module is named twice in the README's layering line"
    assert sorted(layers) == sorted(modules()), "the README's layering line must name every module of gradflow/"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_only_from_its_left(name):
    layers = readme_layers()
    for imported, _, node, _ in gradflow_imports(modules()[name]):
        assert imported in layers, f"gradflow/{name}.py:{node.lineno} imports {imported!r}, which is not in the layering"
        assert layers.index(imported) < layers.index(name), (
            f"gradflow/{name}.py:{node.lineno} imports gradflow.{imported}, which stands to its right in the README's layering"
        )


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_at_module_top(name):
    inner = [node.lineno for *_, node, at_top in gradflow_imports(modules()[name]) if not at_top]
    assert not inner, f"gradflow/{name}.py imports gradflow modules inside functions at lines {inner}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_private_names_of_other_modules(name):
    tree = modules()[name]
    bound = {}  # local name -> gradflow module it is bound to
    for imported, names, node, _ in gradflow_imports(tree):
        for alias in getattr(node, "names", ()):
            if alias.name in names:
                assert not (alias.name.startswith("_") and not alias.name.startswith("__")), (
                    f"gradflow/{name}.py:{node.lineno} imports the private name {alias.name} of gradflow.{imported}"
                )
            elif alias.name == imported or alias.name.endswith(f".{imported}"):
                bound[alias.asname or imported] = imported
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            assert not private, f"gradflow/{name}.py:{node.lineno} reads {node.value.id}.{node.attr}, a private name"


def test_the_checks_can_fail(tmp_path):
    """The graph walker sees a late import and a private reach (so the tests above can fail)."""
    tree = ast.parse("def f():\n    from gradflow.flow import _solve\n    import gradflow.model as m\n    return m._x\n")
    found = list(gradflow_imports(tree))
    assert [(imported, at_top) for imported, *_, at_top in found] == [("flow", False), ("model", False)]
    assert found[0][1] == ("_solve",)
