"""The layout rules of the product's packages: no module over 400 lines, no function over 80,
no block nested deeper than four levels in the pipeline's layer, no import cycle."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shapcam", "storage", "tasks", "flows", "dashboards")
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try,
          ast.Match)


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the product."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def depth(node: ast.AST, level: int = 0) -> int:
    """The deepest block nesting under ``node`` (a nested function starts again at 0)."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        inner = level + 1 if isinstance(child, BLOCKS) else level
        deepest = max(deepest, depth(child, inner))
    return deepest


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_module_over_400_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for name, f in modules().items():
        text = f.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for fn in functions(ast.parse(text)):
            if fn.end_lineno - fn.lineno + 1 > 80:
                long_functions.append(f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1}")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_the_pipeline_nests_at_most_four_levels():
    deep = [f"{name}.{fn.name}: {depth(fn)}" for name, f in modules().items()
            if name.startswith("tasks") for fn in functions(ast.parse(f.read_text()))
            if depth(fn) > 4]
    assert not deep, deep


def imports_of(name: str, f: Path, known: set[str]) -> set[str]:
    """The product modules ``name`` imports, at module level or inside functions."""
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports_of(name, f, set(mods)) for name, f in mods.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package's __init__ re-exporting its own submodules is not a cycle
    real = [c for c in cycles if not _init_reexport(c)]
    assert not real, real


def _init_reexport(cycle: str) -> bool:
    nodes = cycle.split(" -> ")
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in itertools.pairwise(nodes))


def test_the_checks_fail_on_a_violation():
    deep = ast.parse("def f():\n for a in b:\n  if a:\n   with c:\n    try:\n     while d:\n"
                     "      pass\n    except E:\n     pass\n")
    assert depth(functions(deep)[0]) == 5
    shallow = ast.parse("def f():\n for a in b:\n  def g():\n   if a:\n    pass\n")
    assert depth(functions(shallow)[0]) == 1


def test_every_module_imports():
    """The quick tier touches every module of the product, also those only the slow tests
    run (flows, servers): each one imports."""
    import importlib

    failed = []
    for name in modules():
        if name == "dashboards.app":  # a Streamlit script: it runs when imported (AppTest does)
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported together
            failed.append(f"{name}: {exc!r}")
    assert not failed, failed
