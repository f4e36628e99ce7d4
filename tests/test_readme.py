"""The README's code runs: its Python blocks execute, every `ddrs ...` and `torchrun ...` command it
shows parses with the real parsers (options and values accepted, the checks that need no files
passed; nothing is opened), its links to docs/ lead to pages, and its test command is the block CI
runs."""

from __future__ import annotations

import re
import subprocess

import pytest
from docs_blocks import CHECKOUT, check_command, page_blocks, run_python, shell_commands

README = CHECKOUT / "README.md"
BLOCKS = page_blocks(README)
COMMANDS = shell_commands(BLOCKS)


def test_the_readme_shows_commands():
    assert {c.split()[1] for c in COMMANDS if c.startswith("ddrs ")} >= {"demo", "certify"}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    check_command(command, README.read_text())


def test_a_readme_command_with_a_wrong_option_is_refused():
    """Negative control: each checked README command, with an option it does not have, is refused
    by the same check (so the check above does look at the options)."""
    checked = [c for c in COMMANDS if c.startswith("ddrs ")]
    assert checked
    for command in checked:
        with pytest.raises((AssertionError, SystemExit)):
            check_command(command + " --no-such-option")


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_python(BLOCKS)
    assert "result" in namespace  # the example certified something


def test_the_readme_python_blocks_all_run():
    assert all(b.not_run is None for b in BLOCKS if b.language == "python")


def test_the_readme_links_to_docs_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert links
    missing = [link for link in links if not (CHECKOUT / link).is_file()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_test_command_is_what_ci_extracts():
    """.ci/run takes the block after <!-- test-command --> with awk; the same awk gives the README's
    test block (pip install with the test extra, then pytest tests)."""
    program = re.search(r"test_command=\$\(awk '([^']+)' README.md\)", (CHECKOUT / ".ci/run").read_text())
    assert program, ".ci/run no longer extracts the test command with awk"
    out = subprocess.run(["awk", program.group(1), "README.md"], cwd=CHECKOUT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '".[test]"' in out.stdout and "pytest tests" in out.stdout.splitlines()[-1]
