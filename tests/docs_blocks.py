"""The code blocks of the README and of the pages under docs/, and how the tests check them.

Python blocks run, page by page, in one namespace per page, in order (a page reads like a script).
The rare block that cannot run in a test (it needs a GPU, torchrun, or minutes of compute) carries
``<!-- not run: REASON -->`` on the line just above its fence; it is compiled instead. Shell blocks
are split into commands: ``ddrs ...`` lines go through ddrs's own argument parsing (with its checks),
``torchrun ...`` lines through torchrun's parser and then, for ``-m ddrs``, ddrs's,
``python -m ddrs.train_digits ...`` lines through that script's parser, and paths the commands name
(``python examples/x.py``, ``.ci/gpu``, ``pytest benchmarks/x.py::test``) must exist. Nothing is
executed by a shell and no file is opened.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
UNCHECKED = ("pip", "sphinx-build")  # installs and the docs build: nothing of ours to parse
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->")
_FENCE = re.compile(r"^(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)


@dataclass
class Block:
    """One fenced code block: where it is, its language, its text and whether the tests run it."""

    page: str
    line: int
    language: str
    body: str
    not_run: str | None = None  # the reason given by a <!-- not run: ... --> marker

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(text: str, page: str = "<page>") -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(before.strip())
        language = match.group("info").strip().split(" ")[0]
        line = text.count("\n", 0, match.start()) + 2  # the first line of the body
        found.append(Block(page, line, language, match.group("body"), marker and marker.group("reason")))
    return found


def page_blocks(path: Path) -> list[Block]:
    return blocks(path.read_text(), str(path.relative_to(CHECKOUT)))


# ----------------------------------------------------------------------------------------- python


def run_python(page_blocks: list[Block]) -> dict:
    """Runs a page's Python blocks in order in one namespace (those marked not-run are compiled
    only) and returns the namespace. A failing block raises with the page and line in its traceback."""
    namespace: dict = {"__name__": "__docs__"}
    for block in page_blocks:
        if block.language != "python":
            continue
        code = compile(block.body, block.where, "exec")
        if block.not_run is None:
            exec(code, namespace)
    return namespace


# ------------------------------------------------------------------------------------------ shell


def commands(block_text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``VAR=value``
    lines substituted (and ``VAR=value`` in front of a command dropped), ``a && b`` split, and one
    command per value combination of the ``for x in a b; do`` loops around them. A leading
    ``cd DIR &&`` is kept as the command's working directory, written ``@DIR `` in front."""
    variables, loops, found = {}, {}, []
    for line in block_text.replace("\\\n", " ").splitlines():
        line = " ".join(re.split(r"\s#", " " + line, maxsplit=1)[0].split())
        if not line:
            continue
        assignment = re.match(r"^([A-Z_]+)=(\"[^\"]*\"|\S+)$", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2).strip('"')
            continue
        for name, values in re.findall(r"for (\w+) in ([^;]+); do", line):
            loops[name] = values.split()
        line = re.sub(r"^(?:for \w+ in [^;]+; do\s*)+", "", line)
        if line in ("done", "done; done") or not line:
            continue
        cwd = ""
        for part in line.split("&&"):
            part = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", part.strip())  # VAR=value in front of a command
            if part.startswith("cd "):
                cwd = part[3:].strip()
                continue
            for name, value in variables.items():
                part = re.sub(rf"\$\{{?{name}\}}?(?!\w)", value, part)
            used = [n for n in loops if re.search(rf"\$\{{?{n}\b", part)]
            for values in itertools.product(*(loops[n] for n in used)):
                command = part
                for name, value in zip(used, values):
                    command = re.sub(rf"\$\{{{name}\}}|\${name}(?!\w)", value, command)
                found.append(f"@{cwd} {command}" if cwd else command)
    return found


def _ddrs(argv: list[str]) -> None:
    from ddrs.cli import parse_args

    args = parse_args(argv)  # a usage error is SystemExit(2)
    expected = argv[1] if argv[:1] == ["--"] else argv[0]
    assert args.command == expected, f"parsed as {args.command!r}, not {expected!r}"


def _train_digits(argv: list[str]) -> None:
    from ddrs.train_digits import build_parser

    args = build_parser().parse_args(argv)
    assert args.out is not None


def _script(path: str, cwd: Path, page_text: str) -> None:
    target = (cwd / path).resolve()
    named_on_page = re.search(rf"#\s*{re.escape(path)}\b", page_text) is not None
    assert target.is_file() or named_on_page, (
        f"no file {path} in the repository, nor a page script of that name"
    )


def check_command(command: str, page_text: str = "") -> str:
    """Checks one shell command (see the module docstring). Returns what checked it ('ddrs',
    'torchrun', 'train_digits', 'path'), or '' for a program of ``UNCHECKED``. Raises AssertionError
    or SystemExit when the command would be refused, or is of a kind it cannot check."""
    cwd = CHECKOUT
    if command.startswith("@"):
        folder, command = command[1:].split(" ", 1)
        cwd = CHECKOUT / folder
        assert cwd.is_dir(), f"cd {folder}: no such folder in the repository"
    argv = shlex.split(command)
    if not argv:
        return ""
    if argv[0] == "ddrs":
        _ddrs(argv[1:])
        return "ddrs"
    if argv[:3] == ["python", "-m", "ddrs"]:
        _ddrs(argv[3:])
        return "ddrs"
    if argv[:3] == ["python", "-m", "ddrs.train_digits"]:
        if "--help" not in argv:
            _train_digits(argv[3:])
        return "train_digits"
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(argv[1:])  # our options must not be swallowed
        after = list(launch.training_script_args)
        if launch.module and launch.training_script in ("ddrs", "ddrs_ext"):
            index = argv.index(launch.training_script)
            assert argv[index + 1 : index + 2] == ["--"], (
                f"put `--` between `-m ddrs` and the command: {command}"
            )
            _ddrs(after[1:] if after[:1] == ["--"] else after)
        elif launch.module and launch.training_script == "ddrs.train_digits":
            _train_digits(after)
        elif launch.module:
            raise AssertionError(f"torchrun -m {launch.training_script}: a module the docs do not know")
        else:
            _script(launch.training_script, cwd, page_text)
        return "torchrun"
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        _script(argv[1], cwd, page_text)
        return "path"
    if argv[0].startswith(".ci/"):
        _script(argv[0], cwd, page_text)
        return "path"
    if argv[0] == "pytest" or argv[:3] == ["python", "-m", "pytest"]:
        for target in argv[1:] if argv[0] == "pytest" else argv[3:]:
            if target.startswith("-") or "/" not in target and not target.endswith(".py"):
                continue
            path, _, test = target.partition("::")
            assert (cwd / path).exists(), f"pytest {target}: no {path}"
            if test:
                assert f"def {test}(" in (cwd / path).read_text(), f"pytest {target}: no {test} in {path}"
        return "path"
    assert argv[0] in UNCHECKED, f"a command the docs tests do not know how to check: {command}"
    return ""


def shell_commands(page: list[Block]) -> list[str]:
    return [c for b in page if b.language in ("bash", "sh", "shell") for c in commands(b.body)]
