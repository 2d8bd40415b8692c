"""mkdocs hook: pages generated from the code, so that they are never out of date, and public
paths only in the built site.

A page line `<!-- help: gflow._cli -->` becomes that module's `_parser().format_help()`; a line
`<!-- api: gflow.models -->` one API entry per public name of the module.

`gflow.solve` and `gflow.sweep` are both functions (re-exported from `gflow._solve` and
`gflow._sweep`) and command-line modules (`python -m gflow.solve`); the API reference must
document the functions by their private definition path, which this hook rewrites to the
public one in every built page, the search index and the inventory (`objects.inv`), so that no
`gflow._` path reaches a reader or another project's cross-references.
"""

import importlib
import os
import re
import zlib
from pathlib import Path

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


def _public_paths() -> dict[str, str]:
    """`{"gflow._solve.solve": "gflow.solve", "gflow.models._attention.AttentionFFN":
    "gflow.models.AttentionFFN", ...}`: every public name's definition path to its public one."""
    import inspect

    import gflow

    paths = {f"gflow{module}.{attribute}": f"gflow.{name}"
             for name, (module, attribute) in gflow._EXPORTS.items()
             if attribute is not None and module.startswith("._")}
    for package in ("models", "tasks", "theory", "observers", "measures", "presets"):
        module = importlib.import_module(f"gflow.{package}")
        for name in _public(module):
            value = getattr(module, name)
            where = getattr(value, "__module__", None) or ""
            qualname = getattr(value, "__qualname__", None)
            if inspect.ismodule(value) or not qualname or where == module.__name__:
                continue
            if "._" in f"{where}.{qualname}":
                paths.setdefault(f"{where}.{qualname}", f"gflow.{package}.{name}")
    return paths


# `gflow._spec.DEFAULT_RTOL`, `gflow._solve.Transition` (a name a private module imports),
# `gflow.tasks._anchor_function.VOCAB`: a private module's name, in a package or at the top.
_SUBMODULE_NAME = re.compile(r"\bgflow(?:\.(\w+))?\._\w+\.(\w+)\b")


def _publish(text: str, paths: dict[str, str]) -> str:
    pattern = re.compile("|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
                         + r"(?![\w])")
    text = pattern.sub(lambda m: paths[m[0]], text)

    # Constants (no `__module__` to map from), e.g. a default value's title in a signature, and
    # names a private module imports: `gflow.tasks._anchor_function.VOCAB` is
    # `gflow.tasks.VOCAB` where the package exports that name, else just `VOCAB`.
    def constant(match: re.Match) -> str:
        package, name = (f"gflow.{match[1]}" if match[1] else "gflow"), match[2]
        try:
            module = importlib.import_module(package)
        except ImportError:
            return name
        return f"{package}.{name}" if hasattr(module, name) else name

    return _SUBMODULE_NAME.sub(constant, text)


def on_post_build(config, **kwargs):
    paths = _public_paths()
    site = Path(config["site_dir"])
    for file in site.rglob("*"):
        if file.suffix in (".html", ".json", ".xml") and file.is_file():
            text = file.read_text(encoding="utf-8")
            if "._" in text:
                file.write_text(_publish(text, paths), encoding="utf-8")
    inventory = site / "objects.inv"
    if inventory.is_file():
        data = inventory.read_bytes()
        # Sphinx inventory v2: four header lines, then one zlib-compressed entry per line.
        header_end = 0
        for _ in range(4):
            header_end = data.index(b"\n", header_end) + 1
        entries = _publish(zlib.decompress(data[header_end:]).decode("utf-8"), paths)
        # A re-exported object is listed under its public path and its definition path: after
        # the rewrite both read the same; keep one line per name and role.
        seen, kept = set(), []
        for line in entries.splitlines():
            key = tuple(line.split()[:2])
            if key not in seen:
                seen.add(key)
                kept.append(line)
        text = "\n".join(kept) + "\n"
        inventory.write_bytes(data[:header_end] + zlib.compress(text.encode("utf-8"), 9))
