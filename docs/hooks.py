"""MkDocs hook: replace `<!-- cli:COMMAND -->` markers with that command's `--help`, generated from the parser."""

from __future__ import annotations

import argparse
import re

MARKER = re.compile(r"<!-- cli:([a-z-]+) -->")


def _help(command: str) -> str:
    from optimum_recon.cli import build_parser

    parser = build_parser()
    if command == "optimum-recon":
        return parser.format_help()
    for action in parser._actions:  # the subcommand parsers
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command].format_help()
    raise KeyError(f"unknown command {command!r} in a cli marker")


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: f"```text\n{_help(m.group(1)).rstrip()}\n```", markdown)
