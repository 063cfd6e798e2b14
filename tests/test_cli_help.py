"""`glandpet --help` and every subcommand's help read as whole sentences (issue 17: the top-level
description was the module docstring's first line, cut mid-sentence at "(imported lazily,").

Walks the parser tree as built (nested subcommands included, and any added later), so a new
subcommand is checked without touching this file."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from glandpet.cli import build_parser

# a phrase or sentence does not stop on these: the rest of it is missing
_DANGLING = re.compile(r"(?:[,;:(\[{/-]|\b(?:and|or|but|of|the|a|an|e\.g\.|i\.e\.))$", re.IGNORECASE)
_PAIRS = ("()", "[]", "{}")


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, help text in the parent's list) for the parser and every subcommand."""
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                for p, s, h in _parsers(sub, (*path, name)):
                    yield p, s, (h if p != (*path, name) else helps.get(name))


def _problems(text: str, sentence: bool) -> list[str]:
    text = " ".join(text.split())
    out = []
    for o, c in _PAIRS:
        if text.count(o) != text.count(c):
            out.append(f"unbalanced {o}{c}")
    if text.count("`") % 2:
        out.append("unbalanced `")
    if _DANGLING.search(text):
        out.append("ends mid-sentence")
    if sentence:
        if not text[:1].isupper() and not text[:1] in "`'\"":
            out.append("does not start a sentence")
        if not re.search(r"[.!?][)\"'`]?$", text):
            out.append("does not end a sentence")
    return out


PARSERS = list(_parsers(build_parser()))


def test_the_tree_has_the_documented_commands():
    names = {" ".join(p) for p, _, _ in PARSERS}
    assert {"", "phantom", "index", "suv-factors", "convert", "init", "check", "atlas", "atlas add"} <= names


@pytest.mark.parametrize("path,parser,listed", PARSERS, ids=[" ".join(p) or "glandpet" for p, _, _ in PARSERS])
def test_help_is_whole_sentences(path, parser, listed):
    where = "glandpet " + " ".join(path)
    if not path:
        assert parser.description, "glandpet --help has no description"
    if parser.description:  # a paragraph: whole sentences
        assert not _problems(parser.description, sentence=True), (where, parser.description,
                                                                   _problems(parser.description, True))
    if path:  # the one-line summary in the parent's command list: a whole phrase
        assert listed, f"{where} has no summary line in its parent's help"
        assert not _problems(listed, sentence=False), (where, listed, _problems(listed, False))
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS and not isinstance(action,
                                                                                    argparse._SubParsersAction):
            text = action.help % {"default": action.default, "prog": parser.prog} if "%(" in action.help \
                else action.help
            assert not _problems(text, sentence=False), (where, action.option_strings or action.dest, text)


def test_top_level_help_as_printed():
    """The console entry point prints the description whole (no cut docstring)."""
    out = subprocess.run([sys.executable, "-c", "import sys; from glandpet.cli import main; sys.exit(main())",
                          "--help"], capture_output=True, text=True, check=True).stdout
    intro = out.split("\n\n")[1]
    assert not _problems(intro, sentence=True), intro
    assert "Parsers live here" not in out  # a developer's note, not a user's
