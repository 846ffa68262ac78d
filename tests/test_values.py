"""Tests for cdc_bridge.values: PostgreSQL text output -> JSON-ready values.

The input texts below are what PostgreSQL 18 actually sends (checked against a real server
and a pgoutput slot with DateStyle=ISO, IntervalStyle=postgres, extra_float_digits=3,
bytea_output=hex and the TimeZone noted), so the expectations pin the real formats.
"""

from __future__ import annotations

import base64
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_bridge.values import (
    JsonValue,
    _parse_array,
    array_element_oid,
    convert_binary,
    convert_value,
    converter_for,
    passthrough,
    type_name,
)

# --------------------------------------------------------------------------- scalars

SCALAR_CASES: list[tuple[int, str, JsonValue]] = [
    # bool
    (16, "t", True),
    (16, "f", False),
    # integers
    (21, "-32768", -32768),
    (21, "32767", 32767),
    (23, "0", 0),
    (23, "-2147483648", -2147483648),
    (20, "9223372036854775807", 9223372036854775807),
    (20, "-9223372036854775808", -9223372036854775808),
    (26, "4294967295", 4294967295),
    # floats (extra_float_digits=3 -> shortest exact text)
    (700, "1.5", 1.5),
    (700, "0.1", 0.1),
    (700, "3.4028235e+38", 3.4028235e38),
    (700, "1e-45", 1e-45),
    (701, "0.1", 0.1),
    (701, "1e+300", 1e300),
    (701, "1e-300", 1e-300),
    (701, "-0", -0.0),
    (701, "NaN", "NaN"),
    (701, "Infinity", "Infinity"),
    (701, "-Infinity", "-Infinity"),
    (700, "NaN", "NaN"),
    (700, "Infinity", "Infinity"),
    (700, "-Infinity", "-Infinity"),
    # numeric: exact text
    (1700, "123.4500", "123.4500"),
    (1700, "0.00000000000000000001", "0.00000000000000000001"),
    (1700, "123456789012345678901234567890", "123456789012345678901234567890"),
    (1700, "NaN", "NaN"),
    (1700, "Infinity", "Infinity"),
    (1700, "-Infinity", "-Infinity"),
    # money (lc_monetary C: '$')
    (790, "$12.50", "$12.50"),
    (790, "-$12.50", "-$12.50"),
    # character types
    (25, "hello, world", "hello, world"),
    (25, "", ""),
    (1043, "varchar value", "varchar value"),
    (1042, "a    ", "a    "),  # bpchar keeps its blank padding
    (19, "abc", "abc"),
    (18, "x", "x"),
    (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    # json / jsonb
    (114, '{"a": 1,  "b":[1,2]}', {"a": 1, "b": [1, 2]}),
    (3802, '{"a": 1, "b": [1, 2]}', {"a": 1, "b": [1, 2]}),
    (
        3802,
        '{"a": "é", "b": null, "c": true, "d": 1.5}',
        {"a": "é", "b": None, "c": True, "d": 1.5},
    ),
    (3802, '"😀"', "😀"),
    (3802, "null", None),
    (3802, "[]", []),
    (3802, "42", 42),
    (114, '{"a": "\\u0000x"}', {"a": "\x00x"}),
    (114, '{"a": 1, "a": 2}', {"a": 2}),  # json keeps duplicates; last one wins
    (3802, '{"a": 18446744073709551615}', {"a": 18446744073709551615}),
    (3802, '{"a": -9223372036854775808}', {"a": -9223372036854775808}),
    (114, '{"a": 1.5e300, "b": 1E-300}', {"a": 1.5e300, "b": 1e-300}),
    (3802, '{"a": 0.1000000000000001}', {"a": 0.1000000000000001}),
    (3802, '{"id": "12345678901234567890123"}', {"id": "12345678901234567890123"}),
    # timestamp
    (1114, "2026-11-27 09:32:10.437029", "2026-11-27T09:32:10.437029"),
    (1114, "2026-11-27 09:32:10", "2026-11-27T09:32:10"),
    (1114, "294276-12-31 23:59:59", "294276-12-31T23:59:59"),
    (1114, "infinity", "infinity"),
    (1114, "-infinity", "-infinity"),
    (1114, "0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
    # timestamptz (TimeZone UTC, Asia/Kolkata, America/New_York, Asia/Kathmandu)
    (1184, "2026-11-27 09:32:10.437029+00", "2026-11-27T09:32:10.437029Z"),
    (1184, "2026-11-27 09:32:10+00", "2026-11-27T09:32:10Z"),
    (1184, "2026-11-27 15:02:10.437029+05:30", "2026-11-27T15:02:10.437029+05:30"),
    (1184, "2026-11-27 04:32:10-05", "2026-11-27T04:32:10-05:00"),
    (1184, "2026-11-27 10:32:10+01", "2026-11-27T10:32:10+01:00"),
    (1184, "2026-11-27 15:17:10+05:45", "2026-11-27T15:17:10+05:45"),
    (1184, "1800-01-01 05:53:28+05:53:28", "1800-01-01T05:53:28+05:53:28"),
    (1184, "1799-12-31 19:03:58-04:56:02", "1799-12-31T19:03:58-04:56:02"),
    (1184, "infinity", "infinity"),
    (1184, "-infinity", "-infinity"),
    (1184, "0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
    (1184, "0044-03-15 17:53:28+05:53:28 BC", "0044-03-15 17:53:28+05:53:28 BC"),
    # date / time / timetz
    (1082, "2026-11-27", "2026-11-27"),
    (1082, "infinity", "infinity"),
    (1082, "-infinity", "-infinity"),
    (1082, "0044-03-15 BC", "0044-03-15 BC"),
    (1082, "12345-01-01", "12345-01-01"),
    (1083, "12:34:56.789", "12:34:56.789"),
    (1083, "24:00:00", "24:00:00"),
    (1266, "12:34:56+00", "12:34:56+00:00"),
    (1266, "12:34:56-08", "12:34:56-08:00"),
    (1266, "12:34:56.5+05:30", "12:34:56.5+05:30"),
    (1266, "12:34:56+05:53:28", "12:34:56+05:53:28"),
    # interval (IntervalStyle=postgres)
    (1186, "1 year 2 mons 3 days 04:05:06.7", "1 year 2 mons 3 days 04:05:06.7"),
    (1186, "-1 days -02:00:00", "-1 days -02:00:00"),
    (1186, "infinity", "infinity"),
    # bytea (hex) -> base64
    (17, "\\x0102ff", "AQL/"),
    (17, "\\x", ""),
    (17, "\\x00", "AA=="),
    (17, "\\x68656c6c6f", "aGVsbG8="),
    # network, bit strings
    (869, "192.168.0.1/24", "192.168.0.1/24"),
    (869, "192.168.0.1", "192.168.0.1"),  # inet_out omits a full mask (inet::text adds it)
    (869, "::1", "::1"),
    (650, "192.168.0.0/24", "192.168.0.0/24"),
    (829, "08:00:2b:01:02:03", "08:00:2b:01:02:03"),
    (774, "08:00:2b:01:02:03:04:05", "08:00:2b:01:02:03:04:05"),
    (1560, "1010", "1010"),
    (1562, "10", "10"),
]


def _same(got: Any, want: Any) -> bool:
    """Equal and of the same JSON kind all the way down (True is not 1, 1 is not 1.0)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, float):
        return bool(got == want and math.copysign(1, got) == math.copysign(1, want))
    return bool(got == want)


@pytest.mark.parametrize(("oid", "text", "expected"), SCALAR_CASES)
def test_scalar(oid: int, text: str, expected: JsonValue) -> None:
    got = convert_value(oid, text)
    assert _same(got, expected), (got, expected)
    assert _same(converter_for(oid)(text), expected)
    orjson.dumps(got)  # always JSON-serialisable


# --------------------------------------------------------------------------- json precision


_INEXACT_JSON = [
    '{"a": 123456789012345678901234567890}',  # > 64-bit integer
    '{"a": 18446744073709551616}',  # 2**64
    '{"a": -9223372036854775809}',  # -2**63 - 1
    '{"a": 0.1000000000000000000001}',  # more digits than a double holds
    '{"a": 123456789.123456789123}',
    "[1, 2, 10000000000000000000000000000000000000000]",  # jsonb prints 1e40 like this
    '{"a": 0.' + "0" * 400 + "15}",  # jsonb's text for 1.5e-400 (underflows to 0.0)
    '{"a": 1' + "0" * 400 + "}",  # jsonb's text for 1e400 (orjson rejects it)
    '{"s": "12345678901234567890123", "a": -0.1000000000000000000001}',
]


@pytest.mark.parametrize("text", _INEXACT_JSON)
@pytest.mark.parametrize("oid", [114, 3802])
def test_json_keeps_text_rather_than_lose_precision(oid: int, text: str) -> None:
    assert convert_value(oid, text) == text


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1e400}',  # json keeps the input text; orjson rejects the overflow
        '{"a": 1E+400}',
        '{"a": 1e-400}',  # underflow to 0.0
        '{"a": 1.234567e-320}',  # subnormal: fewer digits than written
        "[1.0000000000000000000001e5]",
    ],
)
def test_json_exponents_keep_text_rather_than_lose_precision(text: str) -> None:
    assert convert_value(114, text) == text


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (
            3802,
            '{"r": 0.30000000000000004, "n": -0.3333333333333333}',
            {"r": 0.30000000000000004, "n": -0.3333333333333333},
        ),
        (
            3802,
            '{"big": 9223372036854775807, "u": 18446744073709551615}',
            {"big": 9223372036854775807, "u": 18446744073709551615},
        ),
        (
            3802,
            '{"phone": "+1-555-123-4567-8901", "id": "12345678901234567890123"}',
            {"phone": "+1-555-123-4567-8901", "id": "12345678901234567890123"},
        ),
        (3802, '{"ts": "2026-11-27 09:32:10.437029+00"}', {"ts": "2026-11-27 09:32:10.437029+00"}),
        (
            114,
            '{"a": 1.5e300, "b": 1E-300, "c": "e1000"}',
            {"a": 1.5e300, "b": 1e-300, "c": "e1000"},
        ),
        (114, '{"a": 1.50, "b": 100e-2}', {"a": 1.5, "b": 1.0}),
        (114, "[1.7976931348623157e308, 5e-324]", [1.7976931348623157e308, 5e-324]),
    ],
)
def test_json_exact_numbers_are_parsed(oid: int, text: str, expected: JsonValue) -> None:
    assert _same(convert_value(oid, text), expected)


@pytest.mark.parametrize("text", ["", "{", '{"a": }', "NaN", "[1, 2", '"\\ud800"'])
def test_json_unparseable_stays_text(text: str) -> None:
    assert convert_value(3802, text) == text
    assert convert_value(114, text) == text


# --------------------------------------------------------------------------- arrays

ARRAY_CASES: list[tuple[int, str, JsonValue]] = [
    (1007, "{1,2,NULL}", [1, 2, None]),
    (1007, "{}", []),
    (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1007, "{{NULL,1},{2,NULL}}", [[None, 1], [2, None]]),
    (1009, "{{{a}},{{b}}}", [[["a"]], [["b"]]]),
    (1007, "[0:1]={1,2}", [1, 2]),
    (1007, "[-1:0][2:3]={{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1007, "{ 1 , 2 }", [1, 2]),  # array_in syntax (PostgreSQL itself never prints it)
    (
        1009,
        '{"a \\"b\\"","c\\\\\\\\d",NULL,"NULL",""," x","a,b","{}","null","Null","nULl",NULLx}',
        ['a "b"', "c\\\\d", None, "NULL", "", " x", "a,b", "{}", "null", "Null", "nULl", "NULLx"],
    ),
    (
        1009,
        '{"tab\tx","nl\nx","cr\rx","vt\x0bx","ff\x0cx","a b","x\\\\",a;b,é,\xa0x,"","x y"}',
        [
            "tab\tx",
            "nl\nx",
            "cr\rx",
            "vt\x0bx",
            "ff\x0cx",
            "a b",
            "x\\",
            "a;b",
            "é",
            "\xa0x",
            "",
            "x y",
        ],
    ),
    (1009, '{"  a  ","b  c"}', ["  a  ", "b  c"]),
    (1009, "{ a , b  c ,\\ x\\ ,nULl,\\NULL}", ["a", "b  c", " x ", None, "NULL"]),
    (1009, '{a\\,b,c\\}d,"e\\\\f"}', ["a,b", "c}d", "e\\f"]),
    (1009, " [1:2] = { x , y } ", ["x", "y"]),
    (1009, '{{"a"},{b}}', [["a"], ["b"]]),
    (1000, "{t,f,NULL}", [True, False, None]),
    (1001, '{"\\\\x01",NULL,"\\\\x"}', ["AQ==", None, ""]),
    (1002, '{x,"\\"",","}', ["x", '"', ","]),
    (1003, '{pg_class,"a b"}', ["pg_class", "a b"]),
    (1005, "{1,-32768}", [1, -32768]),
    (1014, '{"a  "}', ["a  "]),
    (1015, '{abc,"d e"}', ["abc", "d e"]),
    (1016, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1021, "{0.1,NaN,-Infinity}", [0.1, "NaN", "-Infinity"]),
    (1022, "{NaN,Infinity,1.5}", ["NaN", "Infinity", 1.5]),
    (1028, "{1,4294967295}", [1, 4294967295]),
    (791, "{$1.50,-$2.00}", ["$1.50", "-$2.00"]),
    (1041, "{192.168.0.1,::1,10.0.0.1/8,NULL}", ["192.168.0.1", "::1", "10.0.0.1/8", None]),
    (651, "{10.0.0.0/8}", ["10.0.0.0/8"]),
    (1040, "{08:00:2b:01:02:03}", ["08:00:2b:01:02:03"]),
    (775, "{08:00:2b:01:02:03:04:05}", ["08:00:2b:01:02:03:04:05"]),
    (1115, '{"2026-11-27 09:32:10",infinity}', ["2026-11-27T09:32:10", "infinity"]),
    (1182, '{2026-01-01,"0044-03-15 BC"}', ["2026-01-01", "0044-03-15 BC"]),
    (1183, "{12:00:00,24:00:00}", ["12:00:00", "24:00:00"]),
    (
        1185,
        '{"2026-11-27 09:32:10+00","2026-11-27 04:32:10-05",infinity,NULL}',
        ["2026-11-27T09:32:10Z", "2026-11-27T04:32:10-05:00", "infinity", None],
    ),
    (1187, '{"1 day",01:00:00}', ["1 day", "01:00:00"]),
    (1231, "{1.50,NaN,NULL}", ["1.50", "NaN", None]),
    (1270, "{12:00:00+00,12:00:00+05:30}", ["12:00:00+00:00", "12:00:00+05:30"]),
    (1561, "{101}", ["101"]),
    (1563, "{1,10}", ["1", "10"]),
    (2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    (199, '{"{\\"a\\":1}"}', [{"a": 1}]),
    (3807, '{"{\\"a\\": 1}","[1, \\"x\\"]","null",NULL}', [{"a": 1}, [1, "x"], None, None]),
    (1017, '{"(1,2)"}', ["(1,2)"]),  # other builtins' arrays: lists of their text
]


@pytest.mark.parametrize(("oid", "text", "expected"), ARRAY_CASES)
def test_array(oid: int, text: str, expected: JsonValue) -> None:
    got = convert_value(oid, text)
    assert _same(got, expected), (got, expected)
    orjson.dumps(got)


def test_box_array_uses_semicolons_and_stays_text() -> None:
    text = "{(3,4),(1,2);(1,1),(0,0)}"
    assert convert_value(1020, text) == text


def test_long_arrays_are_linear() -> None:
    n = 200_000
    ints = "{" + ",".join(str(i) for i in range(n)) + "}"
    assert convert_value(1007, ints) == list(range(n))
    # the general path (quoted elements mixed with unquoted ones)
    mixed = "{" + ",".join(f'"{i} x"' if i % 2 else str(i) for i in range(n)) + "}"
    got = convert_value(1009, mixed)
    assert isinstance(got, list)
    assert len(got) == n
    assert got[:3] == ["0", "1 x", "2"]


ALL_ARRAY_OIDS = [
    1000, 1001, 1002, 1003, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1028, 791,
    1041, 651, 1040, 775, 1115, 1182, 1183, 1185, 1187, 1231, 1270, 1561, 1563, 2951,
    199, 3807,
]  # fmt: skip


@pytest.mark.parametrize("oid", ALL_ARRAY_OIDS)
def test_every_array_oid_parses(oid: int) -> None:
    assert convert_value(oid, "{}") == []
    assert convert_value(oid, "{NULL,NULL}") == [None, None]
    assert convert_value(oid, "{{NULL},{NULL}}") == [[None], [None]]
    element = array_element_oid(oid)
    assert element is not None
    name = type_name(element)
    assert name is not None
    assert type_name(oid) == "_" + name


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize(
    ("oid", "text"),
    [
        (23, "abc"),
        (23, ""),
        (20, "1.5"),
        (700, "abc"),
        (701, ""),
        (16, "true"),
        (16, ""),
        (17, "\\xzz"),
        (17, "\\x0"),
        (17, "\\"),
        (1114, "hello world"),
        (1114, ""),
        (1184, "x y"),
        (1184, ""),
        (1266, ""),
        (114, "{bad"),
        (1007, "{1,2"),
        (1007, "1,2}"),
        (1007, ""),
        (1007, "{"),
        (1009, '{"a'),
        (1009, '{"a\\'),
        (1009, "{a\\"),
        (1009, "{{a},b"),
        (1009, "{a}}"),
        (1009, "{a} x"),
        (1009, "{a,}"),
        (1009, "{,a}"),
        (1009, "[1:2]{a}"),
        (1009, '{"a"b}'),
        (1009, "{{a}"),
    ],
)
def test_malformed_text_comes_back_unchanged(oid: int, text: str) -> None:
    assert convert_value(oid, text) == text


@pytest.mark.parametrize(
    "text",
    [
        "{1,2",
        "1,2}",
        "",
        "{",
        '{"a',
        '{"a\\',
        "{a\\",
        "{{a},b",
        "{a}}",
        "{a} x",
        "{a,}",
        "{,a}",
        "{a,,b}",
        "[1:2]{a}",
        '{"a"b}',
        '{a"b"}',
        '{"a"{b}}',
        "{{a}",
        "{}}",
        "x{}",
        "{a{b}",
        "{a}b,c}",
        "{{1,2}{3,4}}",
        "{{1},{2}},{3}",
        "{{1,},{2}}",
        "{{1},{2}}}",
        "{{{1}},{2}}}",
        "{{1},{2}",
    ],
)
def test_malformed_arrays_are_rejected(text: str) -> None:
    assert convert_value(1009, text) == text
    with pytest.raises(Exception):  # noqa: B017, PT011 - any error means "keep the text"
        _parse_array(text, passthrough)


def test_array_element_fallback() -> None:
    # a malformed element keeps its text; the array still parses
    assert convert_value(1007, "{1,abc}") == [1, "abc"]


def test_escape_format_bytea_is_decoded_too() -> None:
    assert convert_value(17, "a\\\\b\\001\\377") == base64.b64encode(b"a\\b\x01\xff").decode()
    assert convert_value(17, "plain") == base64.b64encode(b"plain").decode()


def test_unknown_oid_is_passthrough() -> None:
    assert converter_for(999_999) is passthrough
    assert convert_value(999_999, "{1,2}") == "{1,2}"
    assert convert_value(16_384, "citext value") == "citext value"
    assert convert_value(3904, "[1,5)") == "[1,5)"  # int4range: known name, text kept
    for oid in (25, 1043, 1042, 19, 18, 1700, 790, 2950, 1082, 1083, 1186, 869, 650):
        assert converter_for(oid) is passthrough


def test_converter_lookup_is_cached() -> None:
    assert converter_for(1007) is converter_for(1007)
    assert converter_for(1184) is converter_for(1184)


def test_type_name() -> None:
    assert type_name(20) == "int8"
    assert type_name(16) == "bool"
    assert type_name(1184) == "timestamptz"
    assert type_name(1007) == "_int4"
    assert type_name(3807) == "_jsonb"
    assert type_name(18) == "char"
    assert type_name(3904) == "int4range"
    assert type_name(999_999) is None
    assert array_element_oid(1185) == 1184
    assert array_element_oid(1184) is None


def test_convert_binary() -> None:
    assert convert_binary(17, b"\x01\x02\xff") == "AQL/"
    assert convert_binary(23, b"\x00\x00\x00\x2a") == "AAAAKg=="
    assert convert_binary(0, b"") == ""
    assert convert_binary(25, memoryview(b"hi")) == "aGk="  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

_ARRAY_WS = " \t\n\r\v\f"


def _quote_like_array_out(item: str) -> str:
    """Quote one element the way PostgreSQL's array_out does."""
    if item == "" or item.upper() == "NULL" or any(c in '{},"\\' or c in _ARRAY_WS for c in item):
        return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return item


def _array_out(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(_array_out(v) for v in value) + "}"
    if value is None:
        return "NULL"
    return _quote_like_array_out(value)


_elements = st.none() | st.text(max_size=12) | st.sampled_from(["NULL", "null", "", " ", "a b"])


@st.composite
def _rectangular(draw: st.DrawFn, elements: st.SearchStrategy[Any]) -> list[Any]:
    dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))

    def build(level: int) -> Any:
        if level == len(dims):
            return draw(elements)
        return [build(level + 1) for _ in range(dims[level])]

    result: list[Any] = build(0)
    return result


@settings(max_examples=500)
@given(_rectangular(_elements))
def test_array_literal_round_trip(value: list[Any]) -> None:
    text = _array_out(value)
    assert convert_value(1009, text) == value
    # both parsers behind the converter agree on array_out text
    assert _parse_array(text, passthrough) == value  # the general parser on its own


def _array_in_spaced(value: Any, space: str) -> str:
    """array_out text with whitespace around the structure (valid array_in syntax)."""
    if isinstance(value, list):
        inner = f"{space},{space}".join(_array_in_spaced(v, space) for v in value)
        return f"{{{space}{inner}{space}}}"
    if value is None:
        return "NULL"
    return _quote_like_array_out(value)


@settings(max_examples=300)
@given(_rectangular(_elements), st.sampled_from([" ", "  ", "\t", "\n ", "\r\n"]))
def test_array_in_whitespace_round_trip(value: list[Any], space: str) -> None:
    text = f"{space}[1:1]{space}={space}" if space == " " and len(value) == 1 else ""
    text += _array_in_spaced(value, space) + space
    assert convert_value(1009, text) == value


@settings(max_examples=200)
@given(_rectangular(st.none() | st.integers(-(2**63), 2**63 - 1)))
def test_int_array_round_trip(value: list[Any]) -> None:
    assert convert_value(1016, _array_out_plain(value)) == value


def _array_out_plain(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(_array_out_plain(v) for v in value) + "}"
    return "NULL" if value is None else str(value)


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trip(value: float) -> None:
    text = repr(value).replace("inf", "Infinity")  # shortest exact, like PostgreSQL
    assert _same(convert_value(701, text), value)


def _pg_timestamptz(moment: datetime) -> str:
    """Format like timestamptz_out with DateStyle=ISO."""
    text = f"{moment.year:04d}-{moment:%m-%d %H:%M:%S}"
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    offset = moment.utcoffset()
    assert offset is not None
    total = int(offset.total_seconds())
    sign = "-" if total < 0 else "+"
    hours, rest = divmod(abs(total), 3600)
    minutes, seconds = divmod(rest, 60)
    text += f"{sign}{hours:02d}"
    if minutes or seconds:
        text += f":{minutes:02d}"
    if seconds:
        text += f":{seconds:02d}"
    return text


@settings(max_examples=300)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-15 * 3600, 15 * 3600),
)
def test_timestamptz_is_iso_8601(naive: datetime, offset_seconds: int) -> None:
    moment = naive.replace(tzinfo=timezone(timedelta(seconds=offset_seconds)))
    got = convert_value(1184, _pg_timestamptz(moment))
    assert isinstance(got, str)
    parsed = datetime.fromisoformat(got)
    assert parsed == moment
    assert parsed.utcoffset() == moment.utcoffset()
    if offset_seconds == 0:
        assert got.endswith("Z")
    timestamp = convert_value(1114, _pg_timestamptz(moment.replace(tzinfo=UTC))[:-3])
    assert isinstance(timestamp, str)
    assert datetime.fromisoformat(timestamp) == naive


KNOWN_OIDS = sorted({oid for oid in range(1, 7000) if type_name(oid) is not None} | {999_999})


@settings(max_examples=1000)
@given(st.sampled_from(KNOWN_OIDS), st.text())
def test_random_text_never_raises(oid: int, text: str) -> None:
    converter_for(oid)(text)


@settings(max_examples=500)
@given(
    st.sampled_from(KNOWN_OIDS),
    st.text(alphabet=st.sampled_from('{}",\\ NUL[]=:01.-+eTx\t'), max_size=30),
)
def test_random_array_like_text_never_raises(oid: int, text: str) -> None:
    converter_for(oid)(text)


@given(st.binary())
def test_convert_binary_round_trips(data: bytes) -> None:
    got = convert_binary(17, data)
    assert isinstance(got, str)
    assert base64.b64decode(got) == data
