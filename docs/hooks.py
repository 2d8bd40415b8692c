"""mkdocs hook: the command lines' `--help`, generated from their parsers (never out of date).

A page line `<!-- help: gflow._cli -->` becomes that module's `_parser().format_help()`.
"""

import importlib
import os
import re

_HELP = re.compile(r"^<!-- help: ([\w.]+) -->$", re.MULTILINE)


def _help(match: re.Match) -> str:
    os.environ["COLUMNS"] = "96"  # argparse wraps to the terminal width: fix it
    module = importlib.import_module(match[1])
    parser = module._parser() if hasattr(module, "_parser") else None
    text = parser.format_help() if parser is not None else module.main.__doc__
    return "```text\n" + text.rstrip() + "\n```"


def on_page_markdown(markdown, **kwargs):
    return _HELP.sub(_help, markdown)
