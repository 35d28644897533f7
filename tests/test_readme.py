"""The README's commands are real: every mers command line shown in its code blocks names a command that
exists and options that command accepts, and each console script it names is installed.

The commands' behaviour is proved by the tests of each package (and end to end by `mers-demo`); this
test keeps the README from drifting away from the CLIs as they change.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_CODE_BLOCK = re.compile(r"^```(?:sh|bash|console)?\n(.*?)^```", re.S | re.M)
_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class ShownCommand:
    line: str
    argv: list[str]


def _console_scripts() -> dict[str, str]:
    """Our console scripts: program name -> "module:attribute"."""
    ours = ("signing.", "board.", "hub.", "factory.", "mers.")
    return {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith(ours)}


def _logical_lines(block: str) -> list[str]:
    """The block's command lines, with backslash continuations joined."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def shown_commands(text: str, programs: set[str]) -> list[ShownCommand]:
    """Every command of `programs` in the text's code blocks, including those after `&&`, `|` or `;`."""
    found = []
    for block in _CODE_BLOCK.findall(text):
        for line in _logical_lines(block):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            argv: list[str] = []
            for token in [*lexer, ";"]:
                if token in {"&&", "||", "|", ";", ">", ">>", "<"}:
                    while argv and _ENV_ASSIGNMENT.match(argv[0]):
                        argv.pop(0)
                    if argv and argv[0] in programs:
                        found.append(ShownCommand(line.strip(), argv))
                    argv = [] if token != ">" else ["<redirect>"]  # a redirection's target is no command
                    continue
                argv.append(token)
    return found


def _group_of(target: str) -> click.Command:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    entry = getattr(module, attribute)
    # an entry point that wraps its command (mers-sign's `run`) has the command beside it
    beside = getattr(module, "cli", None) or getattr(module, "main", None)
    command = entry if isinstance(entry, click.Command) else beside
    assert isinstance(command, click.Command), f"{target} is neither a click command nor beside one"
    return command


def _options_of(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            names.update(parameter.opts)
            names.update(parameter.secondary_opts)
    return names


def check_command(shown: ShownCommand, group: click.Command) -> None:
    """Walk the argv down the click groups, then check each option against the command reached."""
    command, path = group, [shown.argv[0]]
    words = shown.argv[1:]
    while isinstance(command, click.Group):
        subcommands = [word for word in words if not word.startswith("-")]
        assert subcommands, f"README: `{shown.line}` stops at the group `{' '.join(path)}`"
        name = subcommands[0]
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"README: `{shown.line}`: `{' '.join(path)}` has no command {name!r}"
        words = words[words.index(name) + 1 :]
        command, path = sub, [*path, name]
    known = _options_of(command)
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option != "-":
            assert option in known, f"README: `{shown.line}`: `{' '.join(path)}` has no option {option}"


def test_every_mers_command_in_the_readme_exists_with_its_options() -> None:
    scripts = _console_scripts()
    shown = shown_commands(README.read_text(), set(scripts))
    assert len(shown) >= 20, "the README's code blocks were not found"
    for command in shown:
        check_command(command, _group_of(scripts[command.argv[0]]))
    assert {command.argv[0] for command in shown} >= {"mers-sign", "mers-board", "mers-hub", "mers-factory"}


@pytest.mark.parametrize("program", sorted(_console_scripts()))
def test_each_console_script_is_installed_and_answers_help(program: str) -> None:
    executable = Path(sys.executable).parent / program
    assert executable.exists(), f"{program} is not installed next to the interpreter"
    done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout


def test_the_checker_catches_a_command_or_option_that_does_not_exist() -> None:
    group = _group_of(_console_scripts()["mers-sign"])
    [unknown_option] = shown_commands("```sh\nmers-sign verify --kye k.pem x\n```\n", {"mers-sign"})
    with pytest.raises(AssertionError, match="no option --kye"):
        check_command(unknown_option, group)
    [unknown_command] = shown_commands("```sh\nmers-sign sing x\n```\n", {"mers-sign"})
    with pytest.raises(AssertionError, match="no command 'sing'"):
        check_command(unknown_command, group)
