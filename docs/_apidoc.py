"""Checks that the API reference covers the public API: every name in ``ddrs_ext.__all__`` is
documented by an ``auto*`` directive in ``api.md`` and has a docstring of its own.

Used by ``conf.py`` (a problem is a Sphinx warning, so ``sphinx-build -W`` fails) and by
``tests/test_docs.py`` (which needs no Sphinx). A constant's docstring is the ``#:`` comment above
its assignment in the module that defines it, as autodoc reads it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path

API_PAGE = Path(__file__).resolve().parent / "api.md"
_DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|data|module|exception)::\s+(\S+)", re.M)


def attribute_docs(source: str) -> dict[str, str]:
    """``{name: doc}`` for the module-level assignments of ``source`` preceded by ``#:`` comments."""
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if not names:
            continue
        comment, row = [], node.lineno - 2
        while row >= 0 and lines[row].lstrip().startswith("#:"):
            comment.insert(0, lines[row].lstrip()[2:].strip())
            row -= 1
        if comment:
            for name in names:
                docs[name] = " ".join(comment)
    return docs


def constant_docs(package: types.ModuleType) -> dict[str, str]:
    """``#:`` docs of the module-level constants of ``package`` and its submodules."""
    docs = {}
    modules = [package.__name__] + [
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if m.name != "__main__"
    ]
    for name in modules:
        module = importlib.import_module(name)
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py"):
            for attr, doc in attribute_docs(Path(path).read_text()).items():
                docs.setdefault(attr, doc)
    return docs


def own_docstring(obj: object, name: str, constants: dict[str, str]) -> str:
    """The docstring written for ``obj`` (empty when there is none): a module's, function's or class's
    own ``__doc__`` (not one inherited, nor the signature a dataclass makes up), a constant's ``#:``."""
    if isinstance(obj, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
        return (obj.__doc__ or "").strip()
    if isinstance(obj, type):
        doc = (obj.__dict__.get("__doc__") or "").strip()
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # the signature dataclasses write in when the class has no docstring
        return doc
    return constants.get(name, "")


def documented_names(api_text: str, package: str = "ddrs_ext") -> set[str]:
    """Top-level names of ``package`` that an ``auto*`` directive of ``api_text`` documents."""
    prefix = package + "."
    targets = _DIRECTIVE.findall(api_text)
    return {t[len(prefix) :] for t in targets if t.startswith(prefix) and len(t) > len(prefix)}


def problems(package: types.ModuleType | None = None, api_text: str | None = None) -> list[str]:
    """What the API reference lacks: names of ``package.__all__`` without a docstring or not on the
    API page (``package`` defaults to ddrs_ext, ``api_text`` to ``api.md``)."""
    if package is None:
        package = importlib.import_module("ddrs_ext")
    if api_text is None:
        api_text = API_PAGE.read_text()
    constants = constant_docs(package) if hasattr(package, "__path__") else {}
    documented = documented_names(api_text, package.__name__)
    found = []
    for name in package.__all__:
        obj = getattr(package, name)
        if not own_docstring(obj, name, constants):
            kind = "a '#:' comment above its assignment" if not inspect.isroutine(obj) else "a docstring"
            found.append(f"{package.__name__}.{name} has no docstring (give it {kind})")
        if name not in documented:
            found.append(f"{package.__name__}.{name} is in __all__ but not in docs/api.md")
    return found


def field_list(lines: list[str]) -> list[str]:
    """Turns a dataclass docstring's ``field: text`` lines (continued by indented lines) into a bullet
    list, which reStructuredText renders (as written they are one paragraph with stray indents)."""
    out, in_item = [], False
    for line in lines:
        field = re.match(r"^([A-Za-z_][\w, ]*): (.*)$", line)
        if field:
            out.append(f"- ``{field.group(1)}``: {field.group(2)}")
            in_item = True
        elif in_item and line.startswith("    ") and line.strip():
            out.append("  " + line.strip())
        else:
            in_item = False if not line.strip() else in_item
            out.append(line)
    return out
