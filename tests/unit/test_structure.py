"""The layout the next person relies on: every vLLM patch in its own file, listed once and
documented from its docstring; no import cycle; no module too long to read."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: package name -> folder (the kernels are installed as meda_vllm.kernels, see pyproject)
PACKAGES = {"meda_vllm": ROOT / "meda_vllm", "meda_vllm.kernels": ROOT / "kernels"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "meda_vllm" and parts[:1] == ["kernels"]:
                continue
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project that ``name`` imports, anywhere in the file (function-level
    imports too: a cycle through a deferred import is still a cycle of the design)."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                mod = f"{anchor}.{node.module}" if node.module else anchor
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # A package's face may hand on its submodules' names; importing a submodule runs the
    # face first, but the face importing its own children is not a loop of the design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_over_400_lines(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


# ---- the vLLM patches -----------------------------------------------------------------------


def test_every_patch_file_is_applied_and_documented():
    from meda_vllm.vllm_adapter import patch_doc, patches

    listed = {m.__name__ for m in patch_doc.modules()}
    files = {f"{patches.__name__}.{m.name}" for m in pkgutil.iter_modules(patches.__path__)}
    assert listed == files
    for name in sorted(files):
        doc = importlib.import_module(name).__doc__ or ""
        for part in ("Why:", "How:", "Remove when:"):
            assert part in doc, f"{name}: its docstring lacks {part!r}"


def test_patches_md_is_rendered_from_the_patch_files():
    from meda_vllm.vllm_adapter import patch_doc

    text = (ROOT / "meda_vllm" / "vllm_adapter" / "PATCHES.md").read_text()
    assert text == patch_doc.render(), (
        "PATCHES.md is stale: python -m meda_vllm.vllm_adapter.patch_doc "
        "> meda_vllm/vllm_adapter/PATCHES.md"
    )


def test_logic_modules_never_import_the_patch_layer_face():
    """Patch modules import logic, never the other way round except for instance patches
    installed at setup (``plugin.AT_SETUP``), imported by their own module path."""
    mods = _modules()
    known = set(mods)
    face = "meda_vllm.vllm_adapter.plugin"
    for name, path in mods.items():
        if name == face or name.startswith("meda_vllm.vllm_adapter.patch"):
            continue
        assert face not in _imports(name, path, known), name


def test_the_policy_settings_table_is_rendered_from_the_registry():
    from meda_vllm.policies import settings_table

    text = (ROOT / "docs" / "SETTINGS.md").read_text()
    assert text == settings_table(), (
        "docs/SETTINGS.md is stale: python -m meda_vllm.policies > docs/SETTINGS.md"
    )
