"""Tests for cdc_bridge.routing: subject templates, token sanitising, stream coverage."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.routing import (
    BUILTIN_PLACEHOLDERS,
    SubjectTemplate,
    subject_is_covered,
    subject_token,
)

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("template", "placeholders", "stream_filter"),
    [
        ("messages.{conversation_uuid}", {"conversation_uuid"}, "messages.*"),
        ("cdc.{schema}.{table}.{op}", {"schema", "table", "op"}, "cdc.*.*.*"),
        ("a.x{col}y.b", {"col"}, "a.*.b"),
        ("a.{x}{y}.b", {"x", "y"}, "a.*.b"),
        ("{op}", {"op"}, "*"),
        ("{schema}.{table}", {"schema", "table"}, "*.*"),
        ("plain.subject", set(), "plain.subject"),
        ("single", set(), "single"),
        ("orders.{id}.{id}", {"id"}, "orders.*.*"),
        ("a-b.c_d.{_x$1}", {"_x$1"}, "a-b.c_d.*"),
        ("caf\u00e9.{Col}", {"Col"}, "caf\u00e9.*"),
    ],
)
def test_valid_templates(template: str, placeholders: set[str], stream_filter: str) -> None:
    parsed = SubjectTemplate(template)
    assert parsed.template == template
    assert parsed.placeholders == frozenset(placeholders)
    assert parsed.stream_filter == stream_filter
    assert repr(parsed) == f"SubjectTemplate({template!r})"


def test_builtin_placeholders() -> None:
    assert frozenset({"schema", "table", "op"}) == BUILTIN_PLACEHOLDERS


_EMPTY_TOKEN = "has an empty token ('..' or an edge '.')"
_BAD_LITERAL = "literal text may not contain braces, spaces, control characters, '*' or '>'"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "subject template '' is empty or has surrounding spaces"),
        (" a.b", "subject template ' a.b' is empty or has surrounding spaces"),
        ("a.b ", "subject template 'a.b ' is empty or has surrounding spaces"),
        ("a.b\n", "subject template 'a.b\\n' is empty or has surrounding spaces"),
        ("a..b", f"subject template 'a..b' {_EMPTY_TOKEN}"),
        (".a", f"subject template '.a' {_EMPTY_TOKEN}"),
        ("a.", f"subject template 'a.' {_EMPTY_TOKEN}"),
        (".", f"subject template '.' {_EMPTY_TOKEN}"),
        ("a.{x}.", f"subject template 'a.{{x}}.' {_EMPTY_TOKEN}"),
        ("a.*", f"subject template 'a.*': {_BAD_LITERAL}"),
        ("a.>", f"subject template 'a.>': {_BAD_LITERAL}"),
        (">", f"subject template '>': {_BAD_LITERAL}"),
        ("a.b*", f"subject template 'a.b*': {_BAD_LITERAL}"),
        ("a b", f"subject template 'a b': {_BAD_LITERAL}"),
        ("a.\tb", f"subject template 'a.\\tb': {_BAD_LITERAL}"),
        ("a\nb", f"subject template 'a\\nb': {_BAD_LITERAL}"),
        ("a\rb", f"subject template 'a\\rb': {_BAD_LITERAL}"),
        ("a\x00b", f"subject template 'a\\x00b': {_BAD_LITERAL}"),
        ("a\x7fb", f"subject template 'a\\x7fb': {_BAD_LITERAL}"),
        ("a.{b", f"subject template 'a.{{b': {_BAD_LITERAL}"),
        ("a.b}", f"subject template 'a.b}}': {_BAD_LITERAL}"),
        ("a.{{b}}", f"subject template 'a.{{{{b}}}}': {_BAD_LITERAL}"),
        ("a.{}", "subject template 'a.{}': placeholder {} is not a name"),
        ("a.{1abc}", "subject template 'a.{1abc}': placeholder {1abc} is not a name"),
        ("a.{b-c}", "subject template 'a.{b-c}': placeholder {b-c} is not a name"),
        ("a.{b c}", "subject template 'a.{b c}': placeholder {b c} is not a name"),
        ("a.{b.c}", "subject template 'a.{b.c}': placeholder {b.c} is not a name"),
        ("a.{ b}", "subject template 'a.{ b}': placeholder { b} is not a name"),
        ("a.{*}", "subject template 'a.{*}': placeholder {*} is not a name"),
    ],
)
def test_invalid_templates(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^subject template ") as info:
        SubjectTemplate(template)
    assert str(info.value) == message


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("abc", "abc"),
        ("a.b", "a_b"),
        ("a b", "a_b"),
        ("*", "_"),
        (">", "_"),
        ("a.*.>", "a____"),
        ("...", "___"),
        ("a\tb\nc\rd\x00e\x1ff\x7fg\x0bh\x0ci", "a_b_c_d_e_f_g_h_i"),
        ("", "_"),
        (None, "_"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (1, "1"),
        (-7, "-7"),
        (12345678901234567890, "12345678901234567890"),
        (1.5, "1_5"),
        ("0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b", "0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"),
        (
            uuid.UUID("0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"),
            "0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b",
        ),
        ("caf\u00e9-\u65e5\u672c", "caf\u00e9-\u65e5\u672c"),
        ("a/b:c#d$e", "a/b:c#d$e"),
    ],
)
def test_subject_token(value: object, token: str) -> None:
    assert subject_token(value) == token


# --------------------------------------------------------------------------- rendering


def test_render_fills_placeholders() -> None:
    template = SubjectTemplate("messages.{conversation_uuid}")
    assert (
        template.render({"conversation_uuid": "0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"})
        == "messages.0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"
    )


@pytest.mark.parametrize(
    ("value", "subject"),
    [
        ("x.y", "messages.x_y"),
        ("x y", "messages.x_y"),
        ("*", "messages._"),
        (">", "messages._"),
        ("a\nb\x01", "messages.a_b_"),
        ("", "messages._"),
        (None, "messages._"),
        (True, "messages.true"),
        (False, "messages.false"),
        (42, "messages.42"),
        (-1, "messages.-1"),
    ],
)
def test_render_sanitises_values(value: object, subject: str) -> None:
    assert SubjectTemplate("messages.{id}").render({"id": value}) == subject


def test_render_missing_value_is_underscore() -> None:
    assert SubjectTemplate("cdc.{schema}.{table}.{op}").render({"table": "t"}) == "cdc._.t._"


def test_render_ignores_extra_values() -> None:
    template = SubjectTemplate("orders.{id}")
    assert template.render({"id": 7, "other": "x.y", "op": "insert"}) == "orders.7"


def test_render_placeholder_inside_token() -> None:
    template = SubjectTemplate("a.x{col}y.b")
    assert template.render({"col": "V"}) == "a.xVy.b"
    assert template.render({"col": "1.2"}) == "a.x1_2y.b"
    assert template.render({}) == "a.x_y.b"
    assert SubjectTemplate("a.{x}{y}.b").render({"x": 1, "y": None}) == "a.1_.b"


def test_render_repeated_placeholder() -> None:
    assert SubjectTemplate("o.{id}.{id}").render({"id": "k"}) == "o.k.k"


def test_render_without_placeholders() -> None:
    assert SubjectTemplate("plain.subject").render({"x": 1}) == "plain.subject"


# --------------------------------------------------------------------------- partial


def test_partial_binds_builtins_then_renders_columns() -> None:
    template = SubjectTemplate("cdc.{schema}.{table}.{op}.{id}")
    bound = template.partial({"schema": "public", "table": "conversations", "op": "insert"})
    assert bound.template == "cdc.{schema}.{table}.{op}.{id}"
    assert bound.placeholders == frozenset({"id"})
    assert bound.stream_filter == "cdc.public.conversations.insert.*"
    assert bound.render({"id": 5}) == "cdc.public.conversations.insert.5"
    assert bound.render({"id": "a.b", "schema": "ignored"}) == "cdc.public.conversations.insert.a_b"
    # The original is untouched.
    assert template.placeholders == frozenset({"schema", "table", "op", "id"})
    assert template.render({"id": 5}) == "cdc._._._.5"


def test_partial_sanitises_bound_values() -> None:
    bound = SubjectTemplate("cdc.{schema}.{table}").partial({"schema": "my.schema", "table": ""})
    assert bound.placeholders == frozenset()
    assert bound.stream_filter == "cdc.my_schema._"
    assert bound.render({}) == "cdc.my_schema._"


def test_partial_of_everything() -> None:
    bound = SubjectTemplate("messages.{conversation_uuid}").partial({"conversation_uuid": None})
    assert bound.placeholders == frozenset()
    assert bound.render({"conversation_uuid": "ignored"}) == "messages._"


def test_partial_inside_a_token() -> None:
    bound = SubjectTemplate("a.x{col}y.b").partial({"col": "V"})
    assert bound.placeholders == frozenset()
    assert bound.stream_filter == "a.xVy.b"
    assert bound.render({}) == "a.xVy.b"

    half = SubjectTemplate("a.{x}{y}.b").partial({"x": "1"})
    assert half.placeholders == frozenset({"y"})
    assert half.stream_filter == "a.*.b"
    assert half.render({"y": "2"}) == "a.12.b"
    assert half.render({}) == "a.1_.b"


def test_partial_with_nothing_bound() -> None:
    template = SubjectTemplate("cdc.{schema}.{table}.{op}")
    bound = template.partial({"unrelated": 1})
    assert bound.placeholders == template.placeholders
    assert bound.stream_filter == "cdc.*.*.*"
    assert bound.render({"schema": "s", "table": "t", "op": "delete"}) == "cdc.s.t.delete"


def test_partial_twice() -> None:
    template = SubjectTemplate("{schema}.{table}.{id}")
    bound = template.partial({"schema": "public"}).partial({"table": "t"})
    assert bound.placeholders == frozenset({"id"})
    assert bound.stream_filter == "public.t.*"
    assert bound.render({"id": 3}) == "public.t.3"


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(
    ("subject", "filters", "covered"),
    [
        ("a.b", ["a.b"], True),
        ("a.b", ["a.c"], False),
        ("a.b", ["a"], False),
        ("a", ["a.b"], False),
        ("a.b", ["a.*"], True),
        ("a.b.c", ["a.*"], False),
        ("a", ["a.*"], False),
        ("a.*", ["a.*"], True),
        ("a.>", ["a.*"], False),
        ("a.*", ["a.b"], False),
        ("a.b", ["a.>"], True),
        ("a.b.c.d", ["a.>"], True),
        ("a", ["a.>"], False),
        ("a.*", ["a.>"], True),
        ("a.>", ["a.>"], True),
        ("a.*.>", ["a.>"], True),
        ("a.>", ["a.*.>"], False),
        ("b.c", ["a.>"], False),
        ("a", [">"], True),
        ("a.b.c", [">"], True),
        (">", [">"], True),
        (">", ["*"], False),
        ("*", ["*"], True),
        ("x", ["*"], True),
        ("x.y", ["*"], False),
        ("x.y", ["*.*"], True),
        ("x.y", ["*.y"], True),
        ("x.y", ["*.z"], False),
        ("messages.abc", ["cdc.>", "messages.*"], True),
        ("other.abc", ["cdc.>", "messages.*"], False),
        ("a.b", [], False),
    ],
)
def test_subject_is_covered(subject: str, filters: list[str], covered: bool) -> None:
    assert subject_is_covered(subject, filters) is covered


def test_subject_is_covered_accepts_any_iterable() -> None:
    assert subject_is_covered("a.b", iter(["x", "a.*"])) is True
    assert subject_is_covered("a.b", (f for f in ["x", "y"])) is False


def test_stream_filter_is_covered_by_itself() -> None:
    template = SubjectTemplate("cdc.{schema}.{table}.{op}")
    assert subject_is_covered(template.stream_filter, [template.stream_filter]) is True
    assert subject_is_covered(template.stream_filter, ["cdc.>"]) is True
    assert subject_is_covered(template.stream_filter, ["cdc.public.*.*"]) is False


# --------------------------------------------------------------------------- properties

_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,6}", fullmatch=True)
# Literal text: anything but '.', braces, wildcards, whitespace and control characters.
_LITERALS = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
        blacklist_characters=".{}*>",
    ),
    min_size=1,
    max_size=6,
)
_PART = st.one_of(_LITERALS.map(lambda s: (False, s)), _NAMES.map(lambda n: (True, n)))
_TOKEN = st.lists(_PART, min_size=1, max_size=3)
_TEMPLATES = st.lists(_TOKEN, min_size=1, max_size=5)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.uuids(),
    st.sampled_from(["", ".", "*", ">", " ", "a.b", "\n", "\x00", "x > y"]),
)


def _spell(tokens: list[list[tuple[bool, str]]]) -> str:
    return ".".join(
        "".join(f"{{{text}}}" if is_placeholder else text for is_placeholder, text in token)
        for token in tokens
    )


def _expected_filter(tokens: list[list[tuple[bool, str]]]) -> str:
    return ".".join(
        "*" if any(p for p, _ in token) else "".join(text for _, text in token) for token in tokens
    )


@given(_TEMPLATES, st.data())
def test_rendered_subjects_match_the_stream_filter(
    tokens: list[list[tuple[bool, str]]], data: st.DataObject
) -> None:
    template = SubjectTemplate(_spell(tokens))
    names = sorted({text for token in tokens for is_placeholder, text in token if is_placeholder})
    assert template.placeholders == frozenset(names)
    assert template.stream_filter == _expected_filter(tokens)

    values = data.draw(
        st.fixed_dictionaries({}, optional=dict.fromkeys(names, _VALUES)), label="values"
    )
    subject = template.render(values)

    assert subject_is_covered(subject, [template.stream_filter]) is True
    rendered = subject.split(".")
    assert len(rendered) == len(tokens) == len(template.stream_filter.split("."))
    for token, expected in zip(rendered, tokens, strict=True):
        assert token != ""
        assert not any(c in " \t\r\n\x00*>" or ord(c) < 0x20 or c == "\x7f" for c in token)
        if not any(p for p, _ in expected):
            assert token == "".join(text for _, text in expected)


@given(_TEMPLATES, st.data())
def test_partial_then_render_equals_render(
    tokens: list[list[tuple[bool, str]]], data: st.DataObject
) -> None:
    template = SubjectTemplate(_spell(tokens))
    names = sorted(template.placeholders)
    values = data.draw(st.fixed_dictionaries({n: _VALUES for n in names}), label="values")
    bound_names = data.draw(st.sets(st.sampled_from(names)) if names else st.just(set[str]()))
    bound = template.partial({n: values[n] for n in bound_names})

    assert bound.placeholders == template.placeholders - bound_names
    assert bound.render(values) == template.render(values)
    assert subject_is_covered(bound.stream_filter, [template.stream_filter]) is True
    assert subject_is_covered(bound.render(values), [bound.stream_filter]) is True


@given(_VALUES)
def test_subject_token_is_one_safe_token(value: object) -> None:
    token = subject_token(value)
    assert token != ""
    assert not any(c in ". \t\r\n*>" or ord(c) < 0x20 or c == "\x7f" for c in token)
