"""The error a user can fix, and the one-line form every message takes.

`ConfigError` is what bad input raises anywhere (config keys, files, plug-in names): the command line turns
it into one line and exit code 2. It lives here, below every other module, so the registry and the config
schema raise the same type.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in a configuration: the message names the key path and what to change."""


def clip(text: str, limit: int) -> str:
    """`text` cut at a word boundary to at most `limit` characters (with an ellipsis when cut)."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + "…"


def one_line(err: BaseException | str, limit: int | None = 200) -> str:
    """An exception's message (or a text) on one line, cut at a word boundary to `limit` characters (None: whole)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if limit is None else clip(text, limit)
