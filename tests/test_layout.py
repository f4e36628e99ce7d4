"""The layout of the application package ``ddrs/``: no import cycle among its modules and no module
over MAX_LINES lines, each check with a negative control (a synthetic cycle, a synthetic long
module) that it must catch."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ddrs"
MAX_LINES = 400
_DYNAMIC = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)+)(?::[\w.]+)?$")  # "pkg.module" or "pkg.module:function"


def package_sources(root: Path = ROOT / PACKAGE, package: str = PACKAGE) -> dict[str, str]:
    """``{dotted module name: source}`` of every module under ``root`` (a package's own name for its
    ``__init__.py``)."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join((package, *parts))] = path.read_text()
    return sources


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``: importing a module imports its packages first."""
    parts = name.split(".")
    return [".".join(parts[: k + 1]) for k in range(len(parts))]


def imported_modules(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports, at its top level or inside a function
    (every ``import`` statement anywhere in it), with the packages above them; and those it names
    for a later import by a string ``"package.module"`` or ``"package.module:function"`` (how a
    command names its work for ``ddrs.cli.main``, which imports it with importlib)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]

    def add(target: str) -> None:
        for candidate in _parents(target):
            if candidate in modules and candidate != name:
                found.add(candidate)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package (and the levels above it)
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            add(module)
            for alias in node.names:  # from package import submodule
                add(f"{module}.{alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = _DYNAMIC.match(node.value)
            if named and named.group(1) in modules:
                add(named.group(1))
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: the modules of sources it imports}``."""
    modules = set(sources)
    packages = {m for m in modules if any(other.startswith(m + ".") for other in modules)}
    return {m: imported_modules(m, s, modules, m in packages) for m, s in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def long_modules(sources: dict[str, str], limit: int = MAX_LINES) -> dict[str, int]:
    """The modules of more than ``limit`` lines, with their line counts."""
    counts = {name: len(source.splitlines()) for name, source in sources.items()}
    return {name: n for name, n in counts.items() if n > limit}


# ----------------------------------------------------------------------------- the package


def test_the_package_is_found():
    sources = package_sources()
    assert {"ddrs", "ddrs.cli", "ddrs.commands", "ddrs.commands.certify", "ddrs.results"} <= set(sources)
    graph = import_graph(sources)
    # the checker sees module-level and function-level imports (a sanity check of the graph itself)
    assert "ddrs.commands" in graph["ddrs.cli"]  # from ddrs.commands import COMMANDS (top level)
    assert "ddrs.job" in graph["ddrs.commands.predict"]  # imported inside run()
    assert "ddrs.commands.certify_run" in graph["ddrs.commands.certify"]  # run="...certify_run:run"


def test_no_import_cycle_in_the_application():
    cycle = find_cycle(import_graph(package_sources()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_of_the_application_is_too_long():
    assert long_modules(package_sources()) == {}


def test_one_module_per_command():
    """Each command of ``ddrs --help`` has its module in ddrs.commands, which adds its parser."""
    from ddrs.cli import COMMANDS

    names = [module.__name__ for module in COMMANDS]
    assert names == [
        f"ddrs.commands.{n}" for n in ("demo", "certify", "optimize_sigma", "predict", "analyze", "train")
    ]
    sources = package_sources()
    for name in names:
        tree = ast.parse(sources[name])
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "add_parser" in functions, name


# ----------------------------------------------------------------------------- negative controls


def test_the_cycle_check_catches_a_cycle_through_a_function_level_import():
    sources = {
        "pkg": "",
        "pkg.a": "from pkg.b import thing\n",
        "pkg.b": textwrap.dedent(
            """
            def thing():
                from pkg import c
                return c
            """
        ),
        "pkg.c": "import pkg.a\n",
        "pkg.d": "import os\nfrom pkg import a\n",  # not on the cycle
    }
    cycle = find_cycle(import_graph(sources))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.a", "pkg.b", "pkg.c"}
    del sources["pkg.c"]  # the cycle broken
    assert find_cycle(import_graph(sources)) is None


def test_the_cycle_check_catches_relative_imports_and_two_module_cycles():
    sources = {
        "pkg": "",
        "pkg.sub": "",
        "pkg.sub.x": "from . import y\n",
        "pkg.sub.y": "from ..sub.x import f\n",
    }
    assert set(find_cycle(import_graph(sources))) == {"pkg.sub.x", "pkg.sub.y"}


def test_the_cycle_check_catches_a_cycle_through_a_named_run_function():
    sources = {
        "pkg": "",
        "pkg.cli": "import importlib\nRUN = 'pkg.work:run'\n",
        "pkg.work": "from pkg import cli\n",
    }
    assert set(find_cycle(import_graph(sources))) == {"pkg.cli", "pkg.work"}
    sources["pkg.cli"] = "RUN = 'pkg.missing:run'\nPROG = 'pkg work'\n"  # no such module; not a name
    assert find_cycle(import_graph(sources)) is None


def test_the_length_check_catches_a_long_module():
    sources = {"pkg": "", "pkg.short": "x = 1\n" * MAX_LINES, "pkg.long": "x = 1\n" * (MAX_LINES + 1)}
    assert long_modules(sources) == {"pkg.long": MAX_LINES + 1}
