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
    """The ``ddrs ...`` and ``torchrun ...`` commands of the README's bash blocks: continuation lines
    joined, ``VAR=value`` assignments substituted (and dropped in front of a command), and one command
    per value combination of the ``for x in a b; do`` loops around them."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables, loops = {}, {}
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            assignment = re.match(r"^([A-Z_]+)=(\"[^\"]*\"|\S+)$", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2).strip('"')
                continue
            line = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line)  # VAR=value in front of a command
            for name, values in re.findall(r"for (\w+) in ([^;]+); do", line):
                loops[name] = values.split()
            for part in line.split("&&"):
                part = part.strip()
                if not part.startswith(("ddrs ", "torchrun ")):
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
    if command.startswith("torchrun "):
        # torchrun's own parser must take the line as it stands (no option of ours swallowed), and
        # what follows `-m ddrs --` (or a script) must parse as a ddrs command
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(argv)
        if not (launch.module and launch.training_script in ("ddrs", "ddrs_ext")):
            return
        after = argv[argv.index(launch.training_script) + 1 :]
        assert after[:1] == ["--"], f"put `--` between `-m ddrs` and the command: {command}"
        argv = launch.training_script_args
        argv = argv[1:] if argv[:1] == ["--"] else argv  # argparse may or may not keep the `--`
    if "--help" in argv or "-h" in argv:
        return
    args = build_parser().parse_args(argv)
    assert args is not None


def test_the_readme_shows_torchrun_commands():
    assert any(c.startswith("torchrun ") and " -m ddrs -- certify " in c for c in COMMANDS)
