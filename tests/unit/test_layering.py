"""The layering rules of docs/layout.md, drawn from every import of the code (function-level
and TYPE_CHECKING imports too): import-linter's contracts in pyproject.toml, and no circle
between files. Each check also runs on a copy of the code with one rule broken, so that a
check which cannot fail would show here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("serve", "routing", "retrieval")


def in_fresh_process(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run in a new interpreter whose packages are the ones at `root` (the project or a
    copy): in this process `serve`, `routing` and `retrieval` are imported already, and
    grimp would find those."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


# The editable install's import hook comes before PYTHONPATH: without it, the packages
# at `root` are the ones imported.
WITHOUT_EDITABLE_HOOK = (
    "import sys; sys.meta_path[:] = "
    "[f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's own command on the project (or a copy) at `root`."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return in_fresh_process(root, "-c", WITHOUT_EDITABLE_HOOK + code, "--no-cache")


def file_cycles(root: Path) -> list[list[str]]:
    run_this_file = f"import runpy; runpy.run_path({str(__file__)!r}, run_name='__main__')"
    code = WITHOUT_EDITABLE_HOOK + run_this_file
    result = in_fresh_process(root, "-c", code)
    assert result.returncode == 0, result.stderr
    return [list(c) for c in json.loads(result.stdout)]


def _file_cycles() -> list[list[str]]:
    """The circles between modules (files) of the importable project: strongly connected
    components of the import graph with more than one module."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=False)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(modules)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            # A package's __init__ importing its own submodule is not a circle of files.
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in modules:
        if module not in index:
            visit(module)
    return components


@pytest.fixture(scope="module")
def copy_of_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layering")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("library", "__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_circle_between_files() -> None:
    assert file_cycles(REPO) == []


def test_a_vllm_import_outside_the_engine_breaks_a_contract(copy_of_code: Path) -> None:
    target = copy_of_code / "routing" / "router.py"
    original = target.read_text()
    target.write_text(original + "\n\ndef _f() -> None:\n    import vllm  # noqa: F401\n")
    try:
        result = lint_imports(copy_of_code)
    finally:
        target.write_text(original)
    assert result.returncode != 0
    assert "vLLM is imported only under serve.engine BROKEN" in result.stdout


def test_an_upward_import_breaks_a_contract(copy_of_code: Path) -> None:
    target = copy_of_code / "retrieval" / "query.py"
    original = target.read_text()
    target.write_text(original + "\n\nif False:\n    import serve.settings  # noqa: F401\n")
    try:
        result = lint_imports(copy_of_code)
    finally:
        target.write_text(original)
    assert result.returncode != 0
    assert "serve above routing above retrieval BROKEN" in result.stdout


def test_a_type_only_circle_is_found(copy_of_code: Path) -> None:
    # retrieval.retriever imports retrieval.query; the reverse, type-only, closes a circle.
    target = copy_of_code / "retrieval" / "query.py"
    original = target.read_text()
    target.write_text(
        original + "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from retrieval.retriever import Retriever  # noqa: F401\n"
    )
    try:
        cycles = file_cycles(copy_of_code)
    finally:
        target.write_text(original)
    assert ["retrieval.query", "retrieval.retriever"] in [
        [m for m in c if m in ("retrieval.query", "retrieval.retriever")] for c in cycles
    ]


if __name__ == "__main__":
    print(json.dumps(_file_cycles()))
