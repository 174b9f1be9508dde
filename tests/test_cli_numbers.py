"""Every numeric option of every command takes ASCII digits within its stated bounds, else argparse's one line
(exit 2) naming the flag: no other scripts' digits, '_', spaces, signs, nan, inf or overflow (issue 23, class 3).

The options are found by walking the real parser, so a new numeric option without a row in BOUNDS fails here."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest

from arcvit.backends import backbone_name
from arcvit.cli import _json_table, build_parser, main
from arcvit.errors import ConfigError
from arcvit.numbers import Range, decimal_number, real_number, whole_number
from arcvit.training.config import TrainConfig, settings_markdown
from arcvit.training.storage_url import storage_flag

PREFIX = {  # each command's required arguments (the --out ones are replaced by a folder under tmp_path)
    "train": ["--data", "d", "--out", "{out}"],
    "tune": ["--data", "d", "--out", "{out}", "--trials", "1"],
    "eval": ["--adapter", "a", "--data", "d"],
    "params": [],
    "demo": ["--out", "{out}"],
    "bench": ["--suite", "mini", "--out", "{out}"],
    "export": ["--adapter", "a", "--out", "{out}/x.onnx"],
    "data prepare": ["vtab1k", "--out", "{out}"],
}


def _spec(r: Range) -> tuple:
    return ("whole", r.low, r.high) if r.whole else ("real", r.low, r.high, r.above, r.below)


TRAINING = {  # the flags `_train_flags` adds to train and tune, from TrainConfig's declarations
    "--" + f.name.replace("_", "-"): _spec(f.metadata["bounds"]) for f in fields(TrainConfig) if f.metadata["bounds"]}
RAY = {"--cpus-per-run": ("real", 0, 1024, True, False), "--gpus-per-run": ("real", 0, 1024),
       "--max-retries": ("whole", 0, 100)}
BOUNDS = {
    "train": TRAINING,
    "tune": {**TRAINING, **RAY, "--trials": ("whole", 1, 100_000)},
    "eval": {"--batch-size": ("whole", 1, 65536)},
    "params": {"--rank": ("whole", 1, 65536), "--num-classes": ("whole", 1, 100_000),
               "--batch-size": ("whole", 1, 65536)},
    "demo": {"--epochs": ("whole", 1, 100_000)},
    "bench": {**RAY, "--seeds": ("whole", 0, 2**32 - 1), "--tune": ("whole", 1, 100_000),
              "--epochs": ("whole", 1, 100_000), "--devices": ("whole", 1, 1024)},
    "export": {"--check-batch": ("whole", 2, 4096)},
    "data prepare": {"--max-member-mb": ("real", 0, 1_048_576, True, False),
                     "--max-total-gb": ("real", 0, 1_048_576, True, False)},
}
# Every spelling Python's int()/float() would take and a person would not mean; each kind's parser is shown to
# refuse all of them on one flag (below), and every flag to use a strict parser and its own bounds.
SPELLINGS = ["٣", "１０", "1_0", " 3", "3 ", "+3", "-1", "", "0x10", "nan", "inf", "-inf", "1e999", "3,5",
             "9" * 40]
REPRESENTATIVE = {"whole": ("train", "--batch-size"), "real": ("train", "--lr")}


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every command, nested ones (``data prepare``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from [((*path, name), sub), *_subparsers(sub, (*path, name))]


def _numeric_options() -> dict[str, set[str]]:
    """Every option of every command whose value is converted (not a plain string, a choice or a name that is
    only normalised, as --backbone's local folders are made absolute or --storage's URL is parsed, or a JSON
    object)."""
    found: dict[str, set[str]] = {}
    for path, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if action.option_strings and action.type not in (None, str, backbone_name, storage_flag, _json_table):
                found.setdefault(" ".join(path), set()).add(action.option_strings[0])
    return found


def _bad_values(kind: str, low: float, high: float, above: bool = False, below: bool = False) -> list[str]:
    whole = kind == "whole"
    out_of_bounds = [str(low) if above else str(low - 1) if whole else "-0.5",
                     str(high) if below else str(high + 1) if whole else f"{high * 2:g}"]
    return SPELLINGS + out_of_bounds + (["3.0", "1e2"] if whole else [])


def _good_values(kind: str, low: float, high: float, above: bool = False, below: bool = False) -> list[str]:
    if kind == "whole":
        return [str(low), str(high), "0" * 3 + str(max(low, 1))]
    inner = (low + high) / 2 if high - low < 10 else low + 1
    return [*([] if above else [f"{low:g}"]), *([] if below else [str(high)]), str(inner), "5e-1" if high > 0.5 else
            "1e-3", "1E-2", ".25"]


def _per_flag_bad(kind: str, *spec) -> list[str]:
    """The flag's own bounds, just outside, and one lax spelling of its kind."""
    return _bad_values(kind, *spec)[len(SPELLINGS):] + (["٣"] if kind == "whole" else ["nan"])


CASES = [(command, flag, value) for command, flags in BOUNDS.items() for flag, spec in flags.items()
         for value in _per_flag_bad(*spec)]
CASES += [(command, flag, value) for kind, (command, flag) in REPRESENTATIVE.items() for value in SPELLINGS
          if (command, flag, value) not in CASES]
GOOD = [(command, flag, value) for command, flags in BOUNDS.items() for flag, spec in flags.items()
        for value in _good_values(*spec)]


def _argv(command: str, flag: str, value: str, out: str) -> list[str]:
    return [*command.split(), *(a.format(out=out) for a in PREFIX[command]), f"{flag}={value}"]


def test_every_numeric_option_has_stated_bounds_here():
    """The parser's numeric options are exactly BOUNDS: none converted by Python's lax int/float."""
    found = _numeric_options()
    assert {c: set(f) for c, f in BOUNDS.items()} == found
    for path, sub in _subparsers(build_parser()):
        for action in sub._actions:
            assert action.type not in (int, float), f"arcvit {' '.join(path)} {action.option_strings}"


def test_every_training_setting_is_declared_once_with_help_and_bounds_or_choices():
    """A numeric TrainConfig field without bounds would become a lax string flag; a word setting without choices
    would fail only when the run starts. Only the free-form ones (targets, arc_options) have neither."""
    for f in fields(TrainConfig):
        meta = f.metadata
        assert meta["help"], f.name
        if re.search(r"\b(int|float)\b", str(f.type)):
            assert meta["bounds"] is not None, f.name
        elif f.type.startswith("str") and f.name != "targets":
            assert meta["choices"], f.name


def test_docs_settings_table_is_generated_from_the_declarations():
    doc = Path(__file__).parents[1] / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), "regenerate docs/settings.md (the command is in its header)"


def test_train_help_states_each_range_and_default():
    train = dict(_subparsers(build_parser()))[("train",)]
    text = " ".join(train.format_help().split())
    assert "--lr LR peak learning rate (AdamW, cosine schedule) (default: 0.01; 0 < x <= 1000000)" in text
    assert "--precision {32-true,16-mixed,bf16-mixed," in text


@pytest.mark.parametrize("settings, message", [
    ({"lr": "fast"}, "^recipe.toml: lr: expected a number 0 < x <= 1000000, got 'fast'$"),
    ({"batch_size": 3.0}, "^recipe.toml: batch_size: expected a whole number from 1 to 65536, got 3.0$"),
    ({"seed": True}, "^recipe.toml: seed: expected a whole number from 0 to 4294967295, got True$"),
    ({"drop_path": 1.0}, r"^recipe.toml: drop_path: expected a number 0 <= x < 1, got 1.0$"),
    ({"rank": 0}, "^recipe.toml: rank: expected a whole number from 1 to 65536, got 0$"),
    ({"precision": "fp7"}, "^recipe.toml: precision: 'fp7' is not one of 32-true, 16-mixed, "),
    ({"strategy": 3}, "^recipe.toml: strategy: '3' is not one of auto, ddp, "),
    ({"compile": "yes"}, "^recipe.toml: compile: expected true or false, got 'yes'$"),
    ({"lr": None}, "^recipe.toml: lr: expected a number 0 < x <= 1000000, got None$"),
])
def test_a_recipe_file_is_checked_against_the_same_declarations(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(settings, "recipe.toml")


@pytest.mark.parametrize("flag, value", [("--precision", "fp7"), ("--strategy", "telepathy"),
                                         ("--accelerator", "abacus"), ("--protocol", "test"), ("--recipe", "x")])
def test_word_settings_are_checked_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--data", "d", "--out", "o", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: invalid choice: {value!r}" in err


def test_arc_options_flag_takes_a_json_object(capsys):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--arc-options", '{"channel_scale": true}'])
    assert args.arc_options == {"channel_scale": True}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--arc-options", "[1]"])
    assert "argument --arc-options: expected a JSON object, got '[1]'" in capsys.readouterr().err
    for hostile in ("[" * 2000 + "]" * 2000, "[" * 20000 + "]" * 20000):  # deep nesting, then sheer length
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["train", "--data", "d", "--out", "o", "--arc-options", hostile])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "argument --arc-options: expected a JSON object" in err


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    """One folder for every refused case's outputs: it must stay empty (cheaper than a tmp_path per case)."""
    return tmp_path_factory.mktemp("refused")


@pytest.mark.parametrize("command, flag, value", CASES)
def test_bad_number_is_one_line_exit_2(command, flag, value, empty, capsys):
    with pytest.raises(SystemExit) as e:
        main(_argv(command, flag, value, str(empty / "out")))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"arcvit {command}: error: argument {flag}: expected ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert repr(value) in err
    assert list(empty.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command, flag, value", GOOD)
def test_good_number_is_read(command, flag, value):
    args = build_parser().parse_args(_argv(command, flag, value, "o"))
    got = getattr(args, flag[2:].replace("-", "_"))
    got = got[0] if isinstance(got, list) else got  # --seeds
    assert math.isclose(got, float(value)) and isinstance(got, int if BOUNDS[command][flag][0] == "whole" else float)


def test_seeds_read_every_value_and_refuse_one_bad_among_them(capsys):
    assert build_parser().parse_args(["bench", "--suite", "mini", "--seeds", "0", "1", "4294967295"]).seeds == [
        0, 1, 4294967295]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--suite", "mini", "--seeds", "0", "٣"])
    assert "argument --seeds: expected a whole number from 0 to 4294967295" in capsys.readouterr().err


def test_the_installed_command_refuses_in_one_line(arcvit_cli, tmp_path):
    done = arcvit_cli("train", "--data", "d", "--out", tmp_path / "out", "--lr", "nan", timeout=120)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip() == (
        "arcvit train: error: argument --lr: expected a number 0 < x <= 1000000 (ASCII digits, optionally with an "
        "exponent as in 1e-3), got 'nan' (see arcvit train --help)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["٣", "１０", "1_0", " 3", "+3", "3.0", "nan", "", None, True, 3, "9" * 40])
def test_library_parsers_refuse_with_the_name_and_bounds(text):
    with pytest.raises(ConfigError, match=r"^top_k: expected a whole number from 1 to 1000 \(ASCII digits\), got "):
        whole_number(text, "top_k", 1, 1000)


def test_library_parsers_read_plain_numbers_and_exponents_only_where_asked():
    assert whole_number("0042", "n", 0, 100) == 42
    assert decimal_number("2.5", "n", 0, 10) == 2.5
    with pytest.raises(ConfigError, match="n: expected a number from 0 to 10"):
        decimal_number("1e-3", "n", 0, 10)
    assert [real_number(t, "lr", 0, 1, above=True) for t in ("1e-3", "3E-2", "0.5", ".5", "1")] == [
        1e-3, 3e-2, 0.5, 0.5, 1.0]
    for text in ("0", "0.0", "1e-400", "1.5", "1e", "e3", "1e-3.5", "inf", "nan"):
        with pytest.raises(ConfigError, match=r"lr: expected a number 0 < x <= 1 "):
            real_number(text, "lr", 0, 1, above=True)
