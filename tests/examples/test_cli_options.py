"""Every command-line option of every example script is checked before any work.

Each script exposes ``build_parser()``; the test walks its options (and those of its
sub-commands), requires every option that takes a number or a path to use one of the checked
types of ``examples/training/cli.py`` (which carry the values they refuse), feeds each refused
value and expects argparse's clean error: exit status 2, the option named, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPTS = (
    "demo",
    "ddp_demo",
    "rosmap",
    "brca",
    "food101",
    "n24news",
    "rosmap_grid",
    "rosmap_tune",
    "rosmap_bench",
    "rosmap_released_loop",
    "seed_stats",
)


def parsers(script: str):
    """``(sub-command, parser)`` for the script's parser and each of its sub-commands (parsed on their own)."""
    parser = importlib.import_module(script).build_parser()
    found = [((), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [((name,), sub) for name, sub in action.choices.items()]
    return found


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def value_actions(parser: argparse.ArgumentParser):
    """The actions that take a value (not flags, help or sub-command dispatchers)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def valid_value(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is not None:
        return action.type.accepts
    return "x"


def argv_with(parser: argparse.ArgumentParser, bad_action=None, bad_value=None):
    """A command line with valid values for the required options and positionals, and ``bad_value`` for ``bad_action``."""
    positionals, options = [], []
    for action in value_actions(parser):
        value = bad_value if action is bad_action else valid_value(action)
        if not action.option_strings:
            positionals.append(value)
        elif action is bad_action or action.required:
            options += [action.option_strings[-1], value]
    return positionals + options


CASES = [(script, prefix, parser) for script in SCRIPTS for prefix, parser in parsers(script)]


@pytest.mark.parametrize("script,prefix,parser", CASES, ids=[f"{s}{'-' + p[0] if p else ''}" for s, p, _ in CASES])
def test_every_numeric_or_path_option_has_a_checked_type(script, prefix, parser):
    checked = 0
    for action in value_actions(parser):
        if action.type in (int, float, Path, str) or (action.type is not None and not hasattr(action.type, "rejects")):
            pytest.fail(f"{script} {action.option_strings or action.dest}: type {action.type!r} does not check its range")
        checked += action.type is not None
    if has_subcommands(parser):
        return  # its sub-commands are walked as cases of their own
    parser.parse_args(argv_with(parser))  # the valid values the checked types name do parse
    assert checked  # every script (or sub-command) has at least one checked option


@pytest.mark.parametrize("script,prefix,parser", CASES, ids=[f"{s}{'-' + p[0] if p else ''}" for s, p, _ in CASES])
def test_out_of_range_values_stop_with_a_clean_error(script, prefix, parser, capsys):
    tried = 0
    for action in value_actions(parser):
        if action.type is None:
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        for bad in action.type.rejects:
            argv = argv_with(parser, action, bad)
            with pytest.raises(SystemExit) as stop:
                parser.parse_args(argv)
            err = capsys.readouterr().err
            assert stop.value.code == 2, (script, argv)
            assert name in err and "Traceback" not in err, (script, argv, err)
            assert action.type.__name__ in err or "must name" in err, (script, argv, err)  # the allowed range or kind
            tried += 1
    assert tried or has_subcommands(parser)


@pytest.mark.parametrize("script", ["rosmap_grid", "rosmap_tune", "rosmap_bench"])
def test_sweeps_refuse_an_empty_output_dir_and_bad_passthrough_before_any_work(script, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--output-dir", ""])
    assert stop.value.code == 2 and "--output-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--output-dir", str(tmp_path / "out"), "--epochs", "0"])  # passed on to rosmap.py
    assert stop.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
