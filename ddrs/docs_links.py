"""Where the command line points its users: the documentation page (under docs/ in the repository;
the Sphinx site is built from it) that explains each option (:data:`DOCS_PAGES`, named by usage
errors) and each command (:func:`docs_epilog`, the last paragraph of its --help)."""

from __future__ import annotations

import re
import textwrap

__all__ = ["DOCS_PAGES", "docs_epilog", "docs_page"]

# The documentation page (under docs/ in the repository; built by Sphinx) that explains each option
# named in an error message: the first option of a message that has a page names it.
DOCS_PAGES = {
    **dict.fromkeys(("--memory", "--no-memory"), "memory"),
    **dict.fromkeys(
        ("--optimize", "--sigma-file", "--sigma0", "--iterations", "--num-samples", "--lr", "--estimator")
        + ("--surrogate", "--paper", "--clip", "--sigma-range", "--rule", "--surrogate-samples"),
        "data-dependent-sigma",
    ),
    **dict.fromkeys(("--sequential", "--radius", "--tolerance", "--labels"), "sequential"),
    **dict.fromkeys(
        ("--sigma-levels", "--selector", "--selector-checkpoint", "--selector-sigma", "--alpha-selector")
        + ("--cascade", "--cascade-threshold", "--confidence-routing", "--selector-for"),
        "dual",
    ),
    "--noise": "l1",
    **dict.fromkeys(("--compile", "--channels-last", "--autocast"), "faster"),
    **dict.fromkeys(
        ("--model", "--checkpoint", "--data", "--split", "--image-size", "--out"), "certify-your-model"
    ),
    **dict.fromkeys(("--scheme", "--data-dependent", "--sigma-steps", "--sigma-lr"), "training"),
    "--dist-timeout": "distributed",
}
_OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def docs_page(message: object) -> str | None:
    """``docs/PAGE.md`` for the first option named in ``message`` that a documentation page explains
    (:data:`DOCS_PAGES`), or None."""
    for option in _OPTION.findall(str(message)):
        if option in DOCS_PAGES:
            return f"docs/{DOCS_PAGES[option]}.md"
    return None


def docs_epilog(*pages: str) -> str:
    """The epilog's last paragraph: where the command is documented (pages under docs/)."""
    listed = textwrap.fill(
        ", ".join(f"docs/{page}.md" for page in pages), 96, initial_indent="  ", subsequent_indent="  "
    )
    return "\ndocumentation (docs/ in the repository; or the Sphinx site built from it):\n" + listed + "\n"
