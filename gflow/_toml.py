"""Configurations as TOML text: written by `tomli-w`, read by `tomllib` with a nesting limit,
and commented (for `--show`) from the docstrings of what each table feeds."""

import re
import textwrap
import tomllib
from typing import Any

import tomli_w

from ._errors import InputError

TABLES = ("preset", "problem", "solve", "plot")
# Arrays and inline tables nested deeper than this are refused before tomllib reads them: its
# recursive parser raises RecursionError on a few thousand levels; configs need two or three.
MAX_DEPTH = 32
_PRESET_COMMENTS = {
    "name": "the run's name: the default output directory is runs/<name>-<date>-<time>",
    "description": "one line describing the run",
}


def _nesting(text: str) -> int:
    """The deepest nesting of `[`/`{` in `text`, outside strings and comments (a table header
    `[a.b]` counts as one level)."""
    depth = deepest = 0
    quote = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote in ('"', '"""'):
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif text.startswith('"""', i) or text.startswith("'''", i):
            quote = text[i:i + 3]
            i += 3
            continue
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def loads(text: str, what: str) -> dict:
    """TOML text as a dict; one-line `InputError`s naming `what` (a file, `--set ...`)."""
    if _nesting(text) > MAX_DEPTH:
        raise InputError(f"malformed config {what}: arrays or tables nested deeper than "
                         f"{MAX_DEPTH} levels")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"malformed config {what}: {e}".splitlines()[0]) from None
    except RecursionError:  # a nesting the count above did not see
        raise InputError(f"malformed config {what}: nested too deeply") from None


def field_comments(documented: Any) -> dict[str, str]:
    """`{field: text}` from the `**Fields:**` or `**Arguments:**` list of `documented`'s
    docstring (`- `a`, `b`: text` gives both fields the text)."""
    doc = textwrap.dedent("\n".join((documented.__doc__ or "").splitlines()[1:]))
    comments: dict[str, str] = {}
    bullets = re.split(r"\n(?=- `)", doc)
    for bullet in bullets:
        if not bullet.startswith("- `"):
            continue
        body = " ".join(bullet[2:].split())
        body = re.split(r"\s\*\*\w", body)[0]  # the next section's heading ends the list
        # One bullet may document several fields: "`a`: text; `b`: text".
        for part in re.split(r";\s+(?=`\w+`(?:, `\w+`)*: )", body):
            head, sep, text = part.partition(": ")
            if not sep:
                continue
            for name in re.findall(r"`(\w+)`", head):
                comments.setdefault(name, text.replace("`", ""))
    return comments


def dumps(config: dict, comments: dict[str, dict[str, str]] | None = None) -> str:
    """`config` as TOML text (by `tomli-w`; `None` values are omitted), its known tables in
    their usual order. With `comments` (`{table: {key: text}}`) each key is preceded by its
    comment lines."""
    lines = []
    for table in TABLES + tuple(t for t in config if t not in TABLES):
        values = {k: v for k, v in (config.get(table) or {}).items() if v is not None}
        if not values:
            continue
        text = tomli_w.dumps({table: _plain(values)})
        notes = (comments or {}).get(table) or (_PRESET_COMMENTS if comments is not None
                                                and table == "preset" else {})
        for line in text.splitlines():
            key = _key(line)
            if key is not None and key in notes:
                lines += textwrap.wrap(notes[key], 92, initial_indent="# ",
                                       subsequent_indent="# ")
            lines.append(line)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n" if lines else ""


def _plain(value):
    """Tuples as lists (tomli-w writes lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key(line: str) -> str | None:
    """The key a `key = value` line of a table sets (unquoted), else `None`."""
    if line.startswith(("[", "#", " ")) or " = " not in line:
        return None
    key = line.split(" = ", 1)[0]
    if key.startswith('"'):
        try:
            return tomllib.loads(f"{key} = 0").popitem()[0]
        except tomllib.TOMLDecodeError:
            return None
    return key
