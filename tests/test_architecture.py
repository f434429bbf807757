"""The layout's rules: no import cycles, imports only down the layer table, every module imports on its own,
no function over 60 lines.

The project's modules are those of `flip_fl`, `strategies`, `clients` and `sim.py`. Imports are read
from the source (at any depth, so a function-local import cannot hide a cycle); `import a.b.c` also
imports `a` and `a.b`, as Python does, except a module's own packages (always started before it).
The layers are the table under "## Layers" in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import importlib
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("flip_fl", "strategies", "clients")
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"


def project_files() -> dict[str, Path]:
    """Module name -> source file of every project module."""
    files = {"sim": ROOT / "sim.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports, with the packages Python imports on the way."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    edges: set[str] = set()
    for target in targets:
        parts = target.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # A module's own packages are always imported (started) before it: not an edge that can close a cycle.
    ancestors = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    return {e for e in edges if e in known and e != module and e not in ancestors}


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {m: imported_modules(m, p, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_project_modules():
    graph = import_graph()
    assert len(graph) > 60 and "flip_fl.config" in graph["flip_fl.federation.client"]
    assert cycles(graph) == []


def layer_table(markdown: str) -> list[tuple[str, ...]]:
    """The module prefixes of each layer, lowest first: the `modules` column of the table under "## Layers"."""
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    assert section, "no '## Layers' section"
    rows = [line.strip().strip("|").split("|") for line in section.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "no layer table under '## Layers'"
    column = [cell.strip() for cell in rows[0]].index("modules")
    return [tuple(re.findall(r"`([\w.]+)`", row[column])) for row in rows[2:]]


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    """The index of the layer whose longest prefix (a whole dotted name) names `module`; None if none does."""
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits in a higher layer; unlisted modules too."""
    unlisted = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not unlisted, f"modules in no layer of docs/ARCHITECTURE.md: {unlisted}"
    return sorted((m, target) for m in graph for target in graph[m]
                  if layer_of(target, layers) > layer_of(m, layers))  # type: ignore[operator]


def test_the_layer_check_finds_exactly_the_upward_arrow():
    doc = ("# Doc\n\n## Layers\n\n| layer | modules | what |\n|---|---|---|\n| low | `a`, `b.c` | x |\n"
           "| mid | `b` | y |\n| high | `d` | z |\n\n## Next\n\n| not | `e` |\n")
    layers = layer_table(doc)
    assert layers == [("a", "b.c"), ("b",), ("d",)]
    assert layer_of("b.c.x", layers) == 0 and layer_of("b.x", layers) == 1 and layer_of("bc", layers) is None
    compliant = {"a": set(), "a.x": {"a"}, "b": {"a.x", "b.c"}, "b.x": {"b"}, "b.c": {"a"}, "d": {"b", "a"}}
    assert upward_imports(compliant, layers) == []
    assert upward_imports({**compliant, "b.c.y": {"b.x"}}, layers) == [("b.c.y", "b.x")]
    with pytest.raises(AssertionError, match="'e'"):
        upward_imports({**compliant, "e": set()}, layers)


def test_imports_point_down_the_layer_table():
    layers = layer_table(ARCHITECTURE.read_text())
    assert len(layers) > 5 and layer_of("flip_fl.config.sections", layers) == 1
    new = upward_imports(import_graph(), layers)
    assert not new, "imports up the layer table of docs/ARCHITECTURE.md (rows counted from 1):\n" + "\n".join(
        f"  {m} (row {layer_of(m, layers) + 1}) imports {t} (row {layer_of(t, layers) + 1})"  # type: ignore[operator]
        for m, t in new)


def _import_alone(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as err:  # reported to the parent
        return f"{module}: {type(err).__name__}: {err}"
    return ""


def test_every_module_imports_first_in_a_fresh_process():
    """Each module is the first project module a process imports (third-party libraries are preloaded and
    the processes forked, so this costs milliseconds per module)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method (Linux)")
    modules = sorted(project_files())
    script = (
        "import multiprocessing, sys\n"
        "import numpy, torch, yaml, flwr.app, flwr.serverapp, flwr.clientapp, sklearn\n"
        "from tests.test_architecture import _import_alone\n"
        f"modules = {modules!r}\n"
        "ctx = multiprocessing.get_context('fork')\n"
        "with ctx.Pool(2) as pool:\n"
        "    errors = [e for e in pool.map(_import_alone, modules, chunksize=1) if e]\n"
        "print('\\n'.join(errors))\n"
        "sys.exit(1 if errors else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_all_modules_import_together_in_reverse_order():
    modules = sorted(project_files(), reverse=True)
    script = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def long_functions() -> list[str]:
    """Functions over the limit without a `# long: reason` comment on the line above them (or their decorators)."""
    found = []
    for path in project_files().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            marked = first >= 2 and lines[first - 2].strip().startswith(LONG_MARK)
            if length > MAX_FUNCTION_LINES and not marked:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_60_lines_without_a_reason():
    assert long_functions() == []
