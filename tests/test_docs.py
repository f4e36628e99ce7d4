"""Every code block of the documentation pages (docs/*.md) runs or parses, and the API reference
covers the public API (see tests/docs_blocks.py for what each kind of block goes through)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
from docs_blocks import CHECKOUT, blocks, check_command, commands, page_blocks, run_python, shell_commands

DOCS = CHECKOUT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _page_id(path: Path) -> str:
    return path.stem


def test_the_docs_have_their_pages():
    names = {p.stem for p in PAGES}
    assert {"index", "getting-started", "mathematics", "api", "benchmarks"} <= names
    toctree = (DOCS / "index.md").read_text()
    assert all(name in toctree for name in names - {"index"}), "a page is missing from index.md's toctree"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's Python blocks run in order, in one namespace, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    run_python(page_blocks(page))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_shell_commands_parse(page):
    text = page.read_text()
    for command in shell_commands(page_blocks(page)):
        check_command(command, text)


def test_the_docs_commands_of_every_kind_are_checked():
    kinds = {check_command(c, p.read_text()) for p in PAGES for c in shell_commands(page_blocks(p))}
    assert kinds >= {"ddrs", "torchrun", "train_digits", "path"}


def test_not_run_blocks_are_rare_and_say_why():
    python = [b for p in PAGES for b in page_blocks(p) if b.language == "python"]
    skipped = [b for b in python if b.not_run is not None]
    assert all(b.not_run for b in skipped), "a <!-- not run: --> marker without a reason"
    assert len(skipped) * 5 <= len(python), f"{len(skipped)} of {len(python)} Python blocks are not run"


def test_every_block_has_a_language():
    unlabelled = [b.where for p in PAGES for b in page_blocks(p) if not b.language]
    assert not unlabelled, f"fences without a language (the tests would skip them): {unlabelled}"


# -------------------------------------------------------------------------------- the API reference


def _apidoc():
    spec = importlib.util.spec_from_file_location("_apidoc", DOCS / "_apidoc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_documents_every_public_name():
    assert _apidoc().problems() == []


FAKE_PAGE = [("function", "documented"), ("function", "undocumented"), ("class", "Bare")]


def test_the_api_check_finds_a_missing_docstring_or_page_entry():
    """Negative control: the same check on a package with an undocumented function, a constant
    without a '#:' comment, a dataclass without a docstring and a name absent from the page."""
    apidoc = _apidoc()
    fake = types.ModuleType("fakepkg")

    def documented():
        """Has a docstring."""

    def undocumented():
        pass

    import dataclasses

    @dataclasses.dataclass
    class Bare:
        x: int

    fake.documented, fake.undocumented, fake.Bare, fake.CONSTANT = documented, undocumented, Bare, 3
    fake.__all__ = ["documented", "undocumented", "Bare", "CONSTANT"]
    page = "\n".join(f".. auto{kind}:: fakepkg.{name}" for kind, name in FAKE_PAGE)
    found = apidoc.problems(fake, page)
    assert any("fakepkg.undocumented has no docstring" in p for p in found)
    assert any("fakepkg.Bare has no docstring" in p for p in found)
    assert any("fakepkg.CONSTANT has no docstring" in p for p in found)
    assert any("fakepkg.CONSTANT is in __all__ but not in docs/api.md" in p for p in found)
    assert not any("fakepkg.documented" in p for p in found)


def test_attribute_docs_reads_hash_colon_comments():
    apidoc = _apidoc()
    source = "#: The answer.\n#: Really.\nANSWER = 42\n\nOTHER = 1  #: not above\n"
    assert apidoc.attribute_docs(source) == {"ANSWER": "The answer. Really."}


# ------------------------------------------------------------------------- negative controls


def test_a_broken_python_block_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = "```python\nvalue = 1\n```\n\ntext\n\n```python\nassert value == 2, 'wrong'\n```\n"
    with pytest.raises(AssertionError, match="wrong"):
        run_python(blocks(page))


def test_a_not_run_block_is_compiled_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = "<!-- not run: needs a GPU -->\n```python\nraise RuntimeError('ran')\n```\n"
    (block,) = blocks(page)
    assert block.not_run == "needs a GPU"
    run_python([block])  # not executed
    broken = "<!-- not run: needs a GPU -->\n```python\ndef f(:\n```\n"
    with pytest.raises(SyntaxError):
        run_python(blocks(broken))


def test_a_marker_elsewhere_does_not_skip_a_block():
    page = "<!-- not run: x -->\n\nSome text.\n\n```python\nx = 1\n```\n"
    assert blocks(page)[0].not_run is None


DIGITS = "--checkpoint d.pt --data digits --sigma 0.25"


@pytest.mark.parametrize(
    "command",
    [
        f"ddrs certify {DIGITS} --out a.tsv --no-such-option",
        f"ddrs certify {DIGITS} --radius 0.5 --out a.tsv",  # --radius without --sequential
        "ddrs certify --checkpoint d.pt --data digits --sigma -1 --out a.tsv",
        f"ddrs certfy {DIGITS} --out a.tsv",
        f"torchrun --nproc-per-node 2 -m ddrs certify {DIGITS} --out a.tsv",  # no --
        f"torchrun --nproc-per-node 2 -m ddrs -- certify {DIGITS} --batc 9 --out a.tsv",
        "python -m ddrs.train_digits --scheme nonsense --out x.pt",
        "python examples/no_such_example.py",
        "pytest benchmarks/bench_sequential.py::test_no_such_benchmark",
        "make docs",  # a program the tests do not know: refused rather than skipped
    ],
)
def test_a_wrong_command_is_refused(command):
    with pytest.raises((AssertionError, SystemExit)):
        check_command(command)


@pytest.mark.parametrize(
    "command",
    [
        f"ddrs certify {DIGITS} --out a.tsv",
        f"ddrs certify {DIGITS} --sequential --radius 0.5 --out a.tsv",
        f"torchrun --nproc-per-node 2 -m ddrs -- certify {DIGITS} --batch 9 --out a.tsv",
        "python -m ddrs.train_digits --scheme macer --out x.pt",
        "python examples/certify_digits.py",
        "pytest benchmarks/bench_sequential.py::test_sequential_designs",
    ],
)
def test_the_same_commands_corrected_pass(command):
    """The twins of the refused commands above, without their mistake: what is refused is the mistake."""
    assert check_command(command)


def test_commands_of_a_block_expand_loops_and_variables():
    block = (
        "S=0.25   # a value\n"
        "for m in a b; do\n"
        "  ddrs certify --checkpoint $m.pt --sigma $S \\\n      --out ${m}_x.tsv\n"
        "done\n"
        "cd benchmarks && OMP_NUM_THREADS=1 python -m pytest bench_sequential.py -s\n"
    )
    assert commands(block) == [
        "ddrs certify --checkpoint a.pt --sigma 0.25 --out a_x.tsv",
        "ddrs certify --checkpoint b.pt --sigma 0.25 --out b_x.tsv",
        "@benchmarks python -m pytest bench_sequential.py -s",
    ]
