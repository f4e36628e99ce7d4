"""Sphinx configuration for the ddrs_ext documentation.

Build from the repository root with ``sphinx-build -W -b html docs docs/_build``. autodoc imports
the *installed* ddrs_ext: nothing here puts the checkout on ``sys.path`` (only this folder, for
``_apidoc``), so install the package first (``pip install --no-build-isolation ".[docs]"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docs/ itself, for _apidoc

import _apidoc  # noqa: E402

import ddrs_ext  # noqa: E402

project = "ddrs_ext"
author = "the ddrs_ext developers"
copyright = "the ddrs_ext developers"
version = release = ddrs_ext.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"ddrs_ext {release}"
html_show_sourcelink = False


def _constants() -> dict[str, str]:
    return _apidoc.constant_docs(ddrs_ext)


def _process_docstring(app, what, name, obj, options, lines):
    # A constant re-exported by ddrs_ext (ABSTAIN, PAPER_SETTINGS) carries its '#:' doc in the module
    # that defines it, where autodoc does not look; without this it would show int's or dict's docstring.
    short = name.rpartition(".")[2]
    if what == "data" and name.startswith("ddrs_ext."):
        doc = _constants().get(short)
        lines[:] = [doc] if doc else []
    elif what == "class" and dataclasses.is_dataclass(obj):
        lines[:] = _apidoc.field_list(lines)


def _check_api(app):
    from sphinx.util import logging

    logger = logging.getLogger("ddrs_ext.api")
    for problem in _apidoc.problems(importlib.import_module("ddrs_ext")):
        logger.warning(problem, location="api")


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("builder-inited", _check_api)
