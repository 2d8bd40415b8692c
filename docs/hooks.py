"""mkdocs hook: pages generated from the code, so that they are never out of date.

A page line `<!-- help: gflow._cli -->` becomes that module's `_parser().format_help()`; a line
`<!-- api: gflow.models -->` one API entry per public name of the module.
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




# `<!-- api: gflow.models -->` becomes one `::: gflow.models.NAME` block per public name: the
# re-exports of a package (`from ._x import A as A`) that mkdocstrings does not list itself.
_API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)


def _public(module) -> list[str]:
    import inspect

    names = getattr(module, "__all__", None) or [
        name for name, value in vars(module).items()
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
        and (getattr(value, "__module__", None) or "").startswith("gflow")
    ]
    return names


def _api(match: re.Match) -> str:
    module = importlib.import_module(match[1])
    return "\n\n".join(f"::: {match[1]}.{name}" for name in _public(module))


def _expand(markdown: str) -> str:
    return _API.sub(_api, _HELP.sub(_help, markdown))


def on_page_markdown(markdown, **kwargs):
    return _expand(markdown)
