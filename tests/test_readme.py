"""Every `ddrs ...` command shown in the README parses with the real command line (options and
their values are accepted; no files are opened)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from ddrs.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """The ``ddrs ...`` commands of the README's bash blocks: continuation lines joined, ``VAR=value``
    assignments substituted, and one command per value combination of the ``for x in a b; do`` loops
    around them."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables, loops = {}, {}
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            assignment = re.match(r"^([A-Z_]+)=(\S+)", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            for name, values in re.findall(r"for (\w+) in ([^;]+); do", line):
                loops[name] = values.split()
            for part in line.split("&&"):
                part = part.strip()
                if not part.startswith("ddrs "):
                    continue
                for name, value in variables.items():
                    part = part.replace(f"${name}", value)
                used = [n for n in loops if re.search(rf"\$\{{?{n}\b", part)]
                for values in itertools.product(*(loops[n] for n in used)):
                    command = part
                    for name, value in zip(used, values):
                        command = command.replace(f"${{{name}}}", value)
                        command = re.sub(rf"\${name}(?!\w)", value, command)
                    commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert {c.split()[1] for c in COMMANDS} >= {"demo", "certify", "optimize-sigma", "analyze"}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    if "--help" in argv or "-h" in argv:
        return
    args = build_parser().parse_args(argv)
    assert args is not None
