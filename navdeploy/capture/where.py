"""Where a value sits in a module call, for error messages: ``inputs['past_key_values'].layers[0].keys``.

A path is kept as a chain ``(parent, format, key)`` ending in the root's text, and rendered only when a message
needs it: walking a call builds one per node, on every optimized call."""

from __future__ import annotations

from typing import Any, Union

Where = Union[str, tuple]  # the root's text, or (parent Where, a format such as "[{!r}]" or ".{}", the key)


def where_text(where: Where) -> str:
    """The path as text, e.g. ``where_text((("inputs", "[{!r}]", "kwargs"), ".{}", "layers"))`` is
    ``inputs['kwargs'].layers``."""
    parts: list[str] = []
    node: Any = where
    while isinstance(node, tuple):
        node, form, key = node
        parts.append(form.format(key))
    parts.append(str(node))
    return "".join(reversed(parts))
