"""Subject templates: where each change goes in NATS.

A template such as ``messages.{conversation_uuid}`` or ``cdc.{schema}.{table}.{op}`` is
parsed once, at config time, into literal parts and placeholders. Rendering is then a
join over precomputed parts, cheap enough for the hot path.

Values put into a subject are made safe for NATS: every character that would change the
subject's structure (``.``, ``*``, ``>``, whitespace, control characters) becomes ``_``,
and an empty or NULL value becomes ``_``; so a placeholder always fills exactly one
token, and the stream filter of a template is the template with each placeholder
turned into ``*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "SubjectTemplate",
    "subject_is_covered",
    "subject_token",
]

#: Placeholders every table template may use besides its column names.
BUILTIN_PLACEHOLDERS: Final = frozenset({"schema", "table", "op"})

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_UNSAFE = {ord(c): "_" for c in ".*> \t\r\n\f\v\x00"} | {c: "_" for c in range(0x20)} | {0x7F: "_"}
# Literal template text: no placeholder braces, wildcards, whitespace or control characters
# (a newline in a subject would break the NATS protocol line).
_BAD_LITERAL = frozenset("{}*> \x7f") | {chr(c) for c in range(0x20)}


def subject_token(value: object) -> str:
    """Turn a value into one safe subject token (see the module docstring)."""
    if value is None:
        return "_"
    if value is True:
        return "true"
    if value is False:
        return "false"
    text = value if isinstance(value, str) else str(value)
    return text.translate(_UNSAFE) or "_"


class SubjectTemplate:
    """A parsed subject template. Raises ``ValueError`` naming the problem if invalid."""

    __slots__ = ("_literal", "_parts", "placeholders", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        if not template or template != template.strip():
            raise ValueError(f"subject template {template!r} is empty or has surrounding spaces")
        parts: list[tuple[bool, str]] = []  # (is_placeholder, literal text or name)
        position = 0
        for match in _PLACEHOLDER.finditer(template):
            if match.start() > position:
                parts.append((False, template[position : match.start()]))
            name = match.group(1)
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"subject template {template!r}: placeholder {{{name}}} is not a name"
                )
            parts.append((True, name))
            position = match.end()
        if position < len(template):
            parts.append((False, template[position:]))
        for is_placeholder, text in parts:
            if not is_placeholder and any(c in _BAD_LITERAL for c in text):
                raise ValueError(
                    f"subject template {template!r}: literal text may not contain "
                    "braces, spaces, control characters, '*' or '>'"
                )
        if any(not token for token in self.stream_filter_of(parts).split(".")):
            raise ValueError(
                f"subject template {template!r} has an empty token ('..' or an edge '.')"
            )
        self._parts = tuple(parts)
        self._literal = self._literal_of(self._parts)
        self.placeholders = frozenset(text for is_placeholder, text in parts if is_placeholder)

    @staticmethod
    def stream_filter_of(parts: Iterable[tuple[bool, str]]) -> str:
        # A token holding any placeholder can take any value: that token becomes '*'.
        tokens = "".join("\x00" if is_placeholder else text for is_placeholder, text in parts)
        return ".".join("*" if "\x00" in token else token for token in tokens.split("."))

    @property
    def stream_filter(self) -> str:
        """The NATS subject filter that covers every subject this template renders."""
        return self.stream_filter_of(self._parts)

    def partial(self, values: Mapping[str, object]) -> SubjectTemplate:
        """A template with the placeholders named in ``values`` already filled in.

        The router binds ``{schema}``, ``{table}`` and ``{op}`` once per table and op, so
        only column placeholders are left for the hot path.
        """
        bound = object.__new__(SubjectTemplate)
        bound.template = self.template
        merged: list[tuple[bool, str]] = []
        for is_placeholder, text in self._parts:
            if is_placeholder and text in values:
                is_placeholder, text = False, subject_token(values[text])
            if merged and not is_placeholder and not merged[-1][0]:
                merged[-1] = (False, merged[-1][1] + text)
            else:
                merged.append((is_placeholder, text))
        bound._parts = tuple(merged)
        bound._literal = self._literal_of(bound._parts)
        bound.placeholders = self.placeholders.difference(values)
        return bound

    @staticmethod
    def _literal_of(parts: tuple[tuple[bool, str], ...]) -> str | None:
        """The subject itself when no placeholder is left (``CDC.{op}`` bound to a table
        and op): then rendering costs nothing on the hot path."""
        if len(parts) == 1 and not parts[0][0]:
            return parts[0][1]
        return None

    def render(self, values: Mapping[str, object]) -> str:
        """Fill the placeholders from ``values``; missing names render as ``_``."""
        if self._literal is not None:
            return self._literal
        return "".join(
            subject_token(values.get(text)) if is_placeholder else text
            for is_placeholder, text in self._parts
        )

    def __repr__(self) -> str:
        return f"SubjectTemplate({self.template!r})"


def _filter_covers(stream_filter: str, subject: str) -> bool:
    """True if ``stream_filter`` matches every subject that ``subject`` (wildcards ok) matches."""
    wanted = subject.split(".")
    have = stream_filter.split(".")
    for index, token in enumerate(have):
        if token == ">":
            return index < len(wanted)
        if index >= len(wanted):
            return False
        if token == "*":
            if wanted[index] == ">":
                return False
            continue
        if token != wanted[index]:
            return False
    return len(have) == len(wanted)


def subject_is_covered(subject: str, stream_subjects: Iterable[str]) -> bool:
    """True if one of the stream's subject filters captures every subject of ``subject``."""
    return any(_filter_covers(candidate, subject) for candidate in stream_subjects)
