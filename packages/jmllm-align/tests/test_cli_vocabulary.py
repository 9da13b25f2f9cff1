"""One vocabulary for the five command lines (docs/conventions.md, "Command-line vocabulary").

Every parser of every installed jmllm program is walked, subcommands included:

- every program and command has ``--version``, ``-v/--verbose`` (repeatable) and ``--debug``;
- an option used by two commands is listed in the vocabulary table of docs/conventions.md (its
  one meaning), has the same destination, the same short form and the same choices everywhere;
- a former option name is a hidden alias: not in ``--help``, parsed exactly as the new name;
- every command that loads a model has ``--device`` and ``--dtype {auto,float32,bfloat16,float16}``;
- every option has help, and every default is rendered one way, ``(default: …)``.
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONVENTIONS = ROOT / "docs" / "conventions.md"
PROGRAMS = {
    "jmllm-align": ("jmllm.align.cli", "_build_parser"),
    "jmllm-joint": ("jmllm.joint.cli", "build_parser"),
    "jmllm-judge": ("jmllm.judge.cli", "_parser"),
    "jmllm-bias": ("jmllm.bias.cli", "_parser"),
    "jmllm-userstudy": ("jmllm.userstudy.cli", "_parser"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# names that said the same thing differently before the vocabulary: never visible again
FORMER_NAMES = {"--llava", "--source-model", "--target-model", "--precision", "--json"}
FORMER_NAMES |= {"--images-dir", "--wsol-images"}
# commands that load a model without a model option (--tiny, --owl, --mllm) of their own
LOADS_A_MODEL = {"jmllm-align demo", "jmllm-joint toy eval", "jmllm-userstudy example"}
# commands with a model option that load no model: import-pth records the ids it is given
LOADS_NO_MODEL = {"jmllm-align import-pth"}
MODEL_OPTIONS = {"--tiny", "--owl", "--mllm", "--alignment", "--base"}


@dataclass
class Command:
    name: str  # "jmllm-joint toy eval"
    parser: argparse.ArgumentParser
    leaf: bool  # no subcommands of its own

    def options(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if a.option_strings]

    def visible(self) -> list[argparse.Action]:
        return [
            a
            for a in self.options()
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        ]

    def hidden(self) -> list[argparse.Action]:
        return [a for a in self.options() if a.help is argparse.SUPPRESS]

    def by_string(self, option: str) -> argparse.Action | None:
        return self.parser._option_string_actions.get(option)


def _walk(parser: argparse.ArgumentParser, name: str) -> list[Command]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = [Command(name, parser, not subs)]
    for action in subs:
        for sub_name, sub in action.choices.items():
            found += _walk(sub, f"{name} {sub_name}")
    return found


def _commands() -> list[Command]:
    found: list[Command] = []
    for program, (module, function) in PROGRAMS.items():
        try:
            build = getattr(importlib.import_module(module), function)
        except ModuleNotFoundError:  # an isolated install of fewer packages
            continue
        found += _walk(build(), program)
    return found


COMMANDS = _commands()


def _vocabulary() -> dict[str, str]:
    """Option string -> its row of the vocabulary table in docs/conventions.md."""
    text = CONVENTIONS.read_text(encoding="utf-8")
    section = text.split("## Command-line vocabulary", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        for option in re.findall(r"`(-[^`\s]+)", cells[0]):
            rows[option] = line
    return rows


def _row_values(row: str) -> list[str] | None:
    """The values the table lists for an option with choices (third cell), in order."""
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    if len(cells) < 3 or not cells[2]:
        return None
    return re.findall(r"`([^`]+)`", cells[2]) or None


def _shared_options() -> dict[str, list[tuple[Command, argparse.Action]]]:
    """Visible option strings used by two or more commands (program-level ones included)."""
    uses: dict[str, list[tuple[Command, argparse.Action]]] = {}
    for command in COMMANDS:
        for action in command.visible():
            for option in action.option_strings:
                uses.setdefault(option, []).append((command, action))
    return {option: found for option, found in uses.items() if len(found) > 1}


def test_the_five_programs_are_walked():
    programs = {c.name.split()[0] for c in COMMANDS}
    assert "jmllm-align" in programs  # this package
    assert len([c for c in COMMANDS if c.leaf]) >= 4


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_version_verbose_and_debug(command):
    version, verbose, debug = (command.by_string(o) for o in ("--version", "-v", "--debug"))
    assert isinstance(version, argparse._VersionAction), command.name
    assert isinstance(verbose, argparse._CountAction), command.name
    assert verbose.option_strings == ["-v", "--verbose"]
    assert isinstance(debug, argparse._StoreTrueAction), command.name


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_and_verbosity_parse_the_same_way_everywhere(program, capsys):
    module = pytest.importorskip(PROGRAMS[program][0])
    with pytest.raises(SystemExit) as stop:
        module.main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{program} ") and out.strip() != program
    parser = getattr(module, PROGRAMS[program][1])()
    leaf = next(c for c in _walk(parser, program) if c.leaf)
    words = leaf.name.split()[1:] + _required(leaf)
    before = parser.parse_known_args(["-vv", *words])[0]
    after = parser.parse_known_args([*words, "-v", "-v"])[0]
    plain = parser.parse_known_args(words)[0]
    assert before.verbose == after.verbose == 2 and plain.verbose == 0
    assert plain.debug is False and parser.parse_known_args([*words, "--debug"])[0].debug is True


def test_shared_options_have_one_meaning_written_down():
    vocabulary = _vocabulary()
    problems = []
    for option, uses in sorted(_shared_options().items()):
        names = ", ".join(c.name for c, _ in uses)
        if option not in vocabulary:
            problems.append(f"{option} ({names}): not in the vocabulary table of conventions.md")
            continue
        dests = {a.dest for _, a in uses}
        if len(dests) > 1:
            problems.append(f"{option}: destinations {sorted(dests)} ({names})")
        forms = {tuple(a.option_strings) for _, a in uses}
        if len(forms) > 1:
            problems.append(f"{option}: spelled {sorted(forms)} ({names})")
        # a flag, a count, or a value (given once, or repeatable as chat's turns)
        kinds = {
            "count" if a.__class__.__name__ == "_CountAction" else a.nargs == 0 for _, a in uses
        }
        if len(kinds) > 1:
            problems.append(f"{option}: a flag in some commands, a value in others ({names})")
        values = _row_values(vocabulary[option])
        for command, action in uses:
            if action.choices is None:
                continue
            choices = [str(c) for c in action.choices]
            if values is None:
                problems.append(f"{option} ({command.name}): choices not listed in the table")
            elif [v for v in values if v in choices] != choices:
                problems.append(
                    f"{option} ({command.name}): choices {choices} are not the table's {values} "
                    "(a subset, in its order)"
                )
    assert not problems, "\n".join(problems)


def test_every_documented_option_exists():
    used = {o for c in COMMANDS for a in c.visible() for o in a.option_strings}
    if len({c.name.split()[0] for c in COMMANDS}) < len(PROGRAMS):
        pytest.skip("not every program is installed here")
    missing = sorted(set(_vocabulary()) - used)
    assert not missing, f"conventions.md lists options no command has: {missing}"


def test_former_names_are_hidden_aliases_parsed_as_the_new_ones():
    problems = []
    for command in COMMANDS:
        for action in command.visible():
            shown = set(action.option_strings) & FORMER_NAMES
            if shown:
                problems.append(f"{command.name}: {sorted(shown)} shown in --help")
        for alias in command.hidden():
            twins = [a for a in command.visible() if a.dest == alias.dest]
            if not twins:
                problems.append(f"{command.name}: hidden {alias.option_strings} aliases nothing")
                continue
            new = twins[0]
            if alias.nargs == 0 or isinstance(alias, argparse._StoreConstAction):
                continue  # a flag (e.g. --json for --json-out -): checked by its command's tests
            value, needed = _sample_value(new), _required(command)
            old_args = command.parser.parse_known_args([*needed, alias.option_strings[0], value])
            new_args = command.parser.parse_known_args([*needed, new.option_strings[-1], value])
            if getattr(old_args[0], alias.dest) != getattr(new_args[0], new.dest):
                problems.append(f"{command.name}: {alias.option_strings} parses differently")
    assert not problems, "\n".join(problems)


def _required(command: Command) -> list[str]:
    """Values for a command's required arguments, so that it parses."""
    words: list[str] = []
    for group in command.parser._mutually_exclusive_groups:
        if group.required:
            first = group._group_actions[0]
            words += [first.option_strings[-1]] + (
                [] if first.nargs == 0 else [_sample_value(first)]
            )
    for action in command.parser._actions:
        if action.option_strings and action.required:
            words += [action.option_strings[-1], _sample_value(action)]
        elif not action.option_strings and action.nargs in (None, "+"):
            words.append(_sample_value(action))
    return words


def _sample_value(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    kind = getattr(action.type, "__name__", "")
    return "16" if kind in ("integer", "int", "number", "float") else "some/value"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.leaf], ids=lambda c: c.name)
def test_commands_that_load_a_model_take_device_and_dtype(command):
    options = {o for a in command.visible() for o in a.option_strings}
    if command.name in LOADS_NO_MODEL or not (
        options & MODEL_OPTIONS or command.name in LOADS_A_MODEL
    ):
        pytest.skip("loads no model")
    dtype = command.by_string("--dtype")
    assert command.by_string("--device") is not None, command.name
    assert dtype is not None and tuple(dtype.choices) == DTYPES, command.name


def _rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_option_has_help_and_one_way_to_show_its_default(command):
    problems = []
    one_of_required = [  # one of them must be given: no default to show
        a for g in command.parser._mutually_exclusive_groups if g.required for a in g._group_actions
    ]
    for action in [
        *command.visible(),
        *(a for a in command.parser._actions if not a.option_strings),
    ]:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help is argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{name}: no help")
            continue
        text = _rendered_help(command.parser, action)
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        takes_value = takes_value and action not in one_of_required
        count = text.count("(default: ")
        if takes_value and count != 1:
            problems.append(f"{name}: {count} '(default: …)' in {text!r}")
        odd = re.search(r"\(default [^:]|\(default\)|, default\)|\(\d[\d.]*\)|default on\)", text)
        if odd:
            problems.append(f"{name}: default written another way ({odd.group(0)!r}) in {text!r}")
    assert not problems, f"{command.name}:\n" + "\n".join(problems)


def test_the_standalone_copies_are_the_same_file():
    """jmllm-judge and jmllm-userstudy cannot import jmllm-align: they carry the vocabulary module
    as a file of their own, byte for byte the same."""
    import inspect

    from jmllm.align import vocabulary

    source = inspect.getsource(vocabulary)
    for name in ("jmllm.judge.vocabulary", "jmllm.userstudy.vocabulary"):
        try:
            copy = importlib.import_module(name)
        except ModuleNotFoundError:  # that package is not installed here
            continue
        assert inspect.getsource(copy) == source, name
