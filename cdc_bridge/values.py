"""PostgreSQL text-format column values -> JSON-ready Python values, by type OID.

pgoutput sends every column value in its type's *text output format* (the same text
``SELECT col`` returns to a text-mode client).  The replication session runs with
``DateStyle=ISO``, ``IntervalStyle=postgres``, ``TimeZone=UTC``, ``extra_float_digits=3``
and ``bytea_output=hex``; the converters below rely on those formats.

Usage: look the converter up once per column with :func:`converter_for` (an O(1) dict
lookup; every converter is built at import time), then call it for every value on the hot
path.  Converters are pure, allocation-light and **never raise**: text that does not look
like its type's output (which PostgreSQL never sends) is returned unchanged.

Mapping (OID -> JSON value; arrays are listed after the scalars)::

    type                   OID          JSON value          example: text -> value
    ---------------------  -----------  ------------------  -------------------------------------
    bool                   16           true / false        't' -> True, 'f' -> False
    int2 int4 int8 oid     21 23 20 26  number (int)        '-42' -> -42
    float4 float8          700 701      number (float)      '1e+300' -> 1e300, '0.1' -> 0.1
      non-finite values                 string as given     'NaN' -> "NaN", '-Infinity' ->
                                                            "-Infinity" (JSON has no NaN/inf)
    numeric                1700         string as given     '123.4500' -> "123.4500", 'NaN'
    money                  790          string as given     '-$12.50' (lc_monetary format)
    text varchar bpchar    25 1043 1042 string as given     bpchar keeps its padding: 'a    '
    name "char"            19 18        string as given
    uuid                   2950         string as given
    json jsonb             114 3802     parsed (orjson)     '{"a": [1, 2]}' -> {"a": [1, 2]}
                                        or text, see below
    timestamp              1114         ISO 8601, no zone   '2026-11-27 09:32:10.437029' ->
                                                            "2026-11-27T09:32:10.437029"
    timestamptz            1184         ISO 8601 with zone  '2026-11-27 09:32:10+00' ->
                                                            "2026-11-27T09:32:10Z";
                                                            '...-05' -> "...-05:00";
                                                            '+05:30', '+05:53:28' kept
    date                   1082         string as given     '2026-11-27'
    time                   1083         string as given     '12:34:56.789'
    timetz                 1266         string, bare hour   '12:34:56+00' -> "12:34:56+00:00",
                                        offset gets ':00'   '+05:30' kept
    interval               1186         string as given     '1 year 2 mons 3 days 04:05:06'
    bytea                  17           base64 (standard)   '\\x0102ff' -> "AQL/"
    inet cidr              869 650      string as given     '192.168.0.1', '10.0.0.0/8'
    macaddr macaddr8       829 774      string as given     '08:00:2b:01:02:03'
    bit varbit             1560 1562    string as given     '1010'
    array of any type      1000 1001    (nested) list       '{{1,NULL},{3,4}}' ->
      above or named by    1002 1003                        [[1, None], [3, 4]];
      ``type_name``        1005 1007    elements converted  '{"a \\"b\\"",NULL,"NULL"}' ->
      (not box[], which    1009 1014    by the element      ['a "b"', None, 'NULL'];
      uses ';')            1015 1016    type's converter,   '[0:1]={1,2}' -> [1, 2]
                           1021 1022    NULL -> null;       (explicit bounds dropped)
                           1028 791     unparseable -> the
                           1041 651     text unchanged
                           1040 775
                           1115 1182
                           1183 1185
                           1187 1231
                           1270 1561
                           1563 2951
                           199 3807 ...
    anything else          -            string as given     citext, enums, ranges, geometric
                                                            types, xml, extension types, ...

Special values and choices:

* ``infinity`` / ``-infinity`` of date, timestamp and timestamptz stay those strings.
* BC dates and timestamps (``'0044-03-15 BC'``, ``'0044-03-15 12:00:00 BC'``,
  timestamptz ``'0044-03-15 12:00:00+00 BC'``) are passed through unchanged: ISO 8601 has
  no BC suffix and its expanded year forms are ambiguous across consumers, so we keep the
  PostgreSQL text.  Years beyond 9999 (``'12345-01-01 00:00:00'``) do get the ``T``.
* json/jsonb: parsed with ``orjson.loads``.  orjson silently turns integers outside the
  64-bit range into floats and rounds decimals to the nearest double (and rejects numbers
  that overflow a double).  jsonb stores numbers as ``numeric``, so it can hold e.g.
  ``123456789012345678901234567890`` or ``0.1000000000000000000001`` exactly, and prints
  ``1e400`` as a 401-digit integer.  **Choice:** if the document contains a number that
  would not come back as the same decimal value (an integer outside [-2**63, 2**64-1], a
  decimal whose shortest float repr differs numerically, an overflow or underflow), the
  whole value stays the original JSON *text* (a string), so no digit is ever lost; a
  consumer can parse it with an arbitrary-precision JSON parser.  The check costs a
  bytes translate and one or two substring searches per document: only numbers with 16+
  significant digits or (json only; jsonb never prints exponents) a 3-digit exponent
  can be inexact, and each such spot is checked as a number (0.30000000000000004 is
  fine); only a spot that is not a clean number (digits inside a string) makes the stdlib
  parser re-read the document number by number.  Unparseable text also stays text.
  Duplicate keys in ``json`` (not jsonb) keep the last value, like jsonb does.  Note
  that a JSON ``null`` document and SQL NULL both become ``None``.
* Arrays: unquoted, escape-free array_out text (numbers, booleans, uuids, any number of
  dimensions) is split with C-level ``str.split``; anything else (quoted elements,
  escapes, the whitespace and bounds that array_in accepts) goes through an iterative
  state machine.  Unquoted ``NULL`` (any case) is null, quoted ``"NULL"`` the string.
  Malformed array text (which PostgreSQL never sends) stays text as a whole; an element
  that its element type cannot convert stays that element's text.
* bytea in the legacy ``escape`` output format is decoded too, in case a session runs
  with ``bytea_output=escape``.
* inet prints a host address without ``/32`` or ``/128`` (unlike ``inet::text``).
* float4 values are returned as the Python float of PostgreSQL's shortest-exact text (so
  ``0.1::float4`` -> ``0.1``, not ``0.10000000149011612``).
* Binary-format values (:func:`convert_binary`, only if a binary-mode session is ever
  used) are returned as the base64 text of the raw bytes for now.
"""

from __future__ import annotations

import json
from binascii import b2a_base64
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeAlias

import orjson

__all__ = [
    "Converter",
    "JsonValue",
    "array_element_oid",
    "convert_binary",
    "convert_value",
    "converter_for",
    "passthrough",
    "type_name",
]

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
Converter: TypeAlias = Callable[[str], JsonValue]

# Whitespace as PostgreSQL's array_in/array_out see it (array_isspace).
_WS = " \t\n\r\v\f"


# --------------------------------------------------------------------------- scalars


def passthrough(text: str) -> JsonValue:
    """The converter for unknown and text-like types: the text unchanged."""
    return text


def _bool(text: str) -> JsonValue:
    if text == "t":
        return True
    if text == "f":
        return False
    return text


def _int(text: str) -> JsonValue:
    try:
        return int(text)
    except Exception:
        return text


def _float(text: str) -> JsonValue:
    try:
        value = float(text)
    except Exception:
        return text
    # NaN and the infinities have no JSON form: keep PostgreSQL's spelling.
    if value - value == 0.0:
        return value
    return text


def _timestamp(text: str) -> JsonValue:
    # 'YYYY-MM-DD HH:MM:SS[.ffffff]' -> 'YYYY-MM-DDTHH:MM:SS[.ffffff]'; BC/infinity kept.
    i = text.find(" ")
    if i < 8 or text[i - 3] != "-" or text[i + 3 : i + 4] != ":" or text[-1] == "C":
        return text
    return text.replace(" ", "T", 1)


def _timestamptz(text: str) -> JsonValue:
    # 'YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]'; BC/infinity kept.
    i = text.find(" ")
    if i < 8 or text[i - 3] != "-" or text[i + 3 : i + 4] != ":" or text[-1] == "C":
        return text
    iso = text.replace(" ", "T", 1)
    sign = iso[-3]
    if sign == "+":  # bare-hour offset
        return iso[:-3] + "Z" if iso[-2:] == "00" else iso + ":00"
    if sign == "-":
        return iso + ":00"
    return iso  # '+HH:MM' or '+HH:MM:SS' (historic local mean time offsets)


def _timetz(text: str) -> JsonValue:
    # 'HH:MM:SS[.ffffff]+HH' -> '...+HH:00'; '+HH:MM' and '+HH:MM:SS' kept.
    sign = text[-3:-2]
    if (sign == "+" or sign == "-") and text[2:3] == ":":
        return text + ":00"
    return text


def _bytea(text: str) -> JsonValue:
    try:
        data = bytes.fromhex(text[2:]) if text[:2] == "\\x" else _bytea_unescape(text)
        return b2a_base64(data, newline=False).decode("ascii")
    except Exception:
        return text


def _bytea_unescape(text: str) -> bytes:
    """Decode bytea's legacy 'escape' output format (``bytea_output=escape``)."""
    if "\\" not in text:
        return text.encode("latin-1")
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        j = text.find("\\", i)
        if j < 0:
            out += text[i:].encode("latin-1")
            break
        out += text[i:j].encode("latin-1")
        if text[j + 1] == "\\":
            out.append(0x5C)
            i = j + 2
        else:
            octal = text[j + 1 : j + 4]
            if len(octal) != 3 or not octal.isdigit() or "8" in octal or "9" in octal:
                raise ValueError("bad bytea escape")
            out.append(int(octal, 8))
            i = j + 4
    return bytes(out)


# json/jsonb precision check.  A JSON number that orjson may not return exactly has at
# least 16 significant digits (so a run of >= 16 digits, dots and signs; 64-bit integers
# have up to 20 digits) or a 3-digit exponent; any other number round-trips exactly
# (DBL_DIG is 15).  jsonb prints its numbers with numeric_out, which never uses an
# exponent (1e400 comes out as a 401-digit integer), so for jsonb the run is the only sign.
# _NUMSCAN maps the UTF-8 bytes: digits, '.', '+' and '-' -> '0', 'e'/'E' -> 'e', anything
# else -> ' ', so those spots are found with plain bytes searches.
_NUMSCAN = bytes(
    ord("0") if chr(b) in "0123456789.+-" else ord("e") if chr(b) in "eE" else ord(" ")
    for b in range(256)
)
_LONG_RUN = b"0" * 16
_EXPONENT = b"e000"  # also matches 'e+000' / 'e-000' ('+' and '-' map to '0')
_JSON_MARKERS = (_LONG_RUN, _EXPONENT)
_JSONB_MARKERS = (_LONG_RUN,)
_INT_MIN = -(2**63)  # orjson's (and orjson.dumps') integer range
_INT_END = 2**64


class _Lossy(Exception):
    pass


def _float_exact(token: str | bytes, value: float) -> bool:
    if value - value != 0.0:  # overflowed to inf
        return False
    shortest = repr(value)
    if isinstance(token, bytes):
        token = token.decode("ascii")
    return shortest == token or Decimal(shortest) == Decimal(token)


def _exact_float(token: str) -> float:
    value = float(token)
    if not _float_exact(token, value):
        raise _Lossy
    return value


def _exact_int(token: str) -> int:
    value = int(token)
    if not _INT_MIN <= value < _INT_END:
        raise _Lossy
    return value


def _token_exact(token: bytes) -> bool:
    """Whether ``token`` read as a JSON number comes back exactly from orjson."""
    try:
        if b"." in token or b"e" in token or b"E" in token:
            return _float_exact(token, float(token))
        return _INT_MIN <= int(token) < _INT_END
    except Exception:
        return False  # not a number after all (e.g. digits inside a string)


def _json_numbers_exact(text: str, raw: bytes, scan: bytes, markers: tuple[bytes, ...]) -> bool:
    # Check each suspicious spot as a number.  Spots inside strings may also look like
    # (inexact) numbers; only then does the stdlib parser decide, number by number.
    n = len(scan)
    for marker in markers:
        pos = scan.find(marker)
        while pos >= 0:
            start = scan.rfind(b" ", 0, pos) + 1
            end = scan.find(b" ", pos)
            if end < 0:
                end = n
            if not _token_exact(raw[start:end]):
                try:
                    json.loads(text, parse_float=_exact_float, parse_int=_exact_int)
                except Exception:
                    return False
                return True
            pos = scan.find(marker, end)
    return True


def _json(text: str) -> JsonValue:
    try:
        value: JsonValue = orjson.loads(text)
        raw = text.encode()
    except Exception:
        return text
    scan = raw.translate(_NUMSCAN)
    if (_LONG_RUN in scan or _EXPONENT in scan) and not _json_numbers_exact(
        text, raw, scan, _JSON_MARKERS
    ):
        return text
    return value


def _jsonb(text: str) -> JsonValue:
    try:
        value: JsonValue = orjson.loads(text)
        raw = text.encode()
    except Exception:
        return text
    scan = raw.translate(_NUMSCAN)
    if _LONG_RUN in scan and not _json_numbers_exact(text, raw, scan, _JSONB_MARKERS):
        return text
    return value


# --------------------------------------------------------------------------- arrays


class _Malformed(Exception):
    pass


def _skip_ws(text: str, i: int) -> int:
    while text[i] in _WS:
        i += 1
    return i


def _parse_array(text: str, conv: Converter) -> JsonValue:
    """Parse any array literal (array_in syntax): an iterative state machine.

    Handles quoting, backslash escapes, NULL, whitespace around elements and structure,
    any number of dimensions and an explicit '[lb:ub]...=' bounds prefix (dropped).
    Raises on malformed text.
    """
    ident = conv is passthrough
    has_backslash = "\\" in text
    n = len(text)
    i = _skip_ws(text, 0)
    if text[i] == "[":  # explicit bounds: '[0:1][1:2]={...}'
        i = _skip_ws(text, text.index("=", i) + 1)
    if text[i] != "{":
        raise _Malformed
    root: list[JsonValue] = []
    stack: list[list[JsonValue]] = [root]
    cur = root
    i += 1
    # Positions of the next ',' and '}' at or after i (refreshed lazily: keeps long
    # arrays linear instead of re-scanning to the closing brace for every element).
    next_comma = -1
    next_close = -1
    expect_value = True  # after '{' or ','
    just_opened = True  # after '{': '}' may close an empty array
    while True:
        c = text[i]
        if c in _WS:
            i = _skip_ws(text, i)
            c = text[i]
        if not expect_value:
            if c == ",":
                expect_value = True
                just_opened = False
                i += 1
                continue
            if c != "}":
                raise _Malformed
            stack.pop()
            i += 1
            if not stack:
                if i != n and text[i:].strip(_WS):
                    raise _Malformed
                return root
            cur = stack[-1]
            continue
        # expecting an element, a sub-array, or '}' right after '{'
        if c == '"':
            if has_backslash:
                parts: list[str] = []
                k = i + 1
                while True:
                    q = text.find('"', k)
                    if q < 0:
                        raise _Malformed
                    b = text.find("\\", k, q)
                    if b < 0:
                        parts.append(text[k:q])
                        break
                    parts.append(text[k:b])
                    parts.append(text[b + 1])
                    k = b + 2
                item = parts[0] if len(parts) == 1 else "".join(parts)
            else:
                q = text.find('"', i + 1)
                if q < 0:
                    raise _Malformed
                item = text[i + 1 : q]
            cur.append(item if ident else conv(item))
            i = q + 1
        elif c == "{":
            sub: list[JsonValue] = []
            cur.append(sub)
            stack.append(sub)
            cur = sub
            i += 1
            just_opened = True
            continue
        elif c == "}":
            if not just_opened:
                raise _Malformed
            expect_value = False
            continue
        elif c == ",":
            raise _Malformed
        else:
            if next_comma < i:
                next_comma = text.find(",", i)
                if next_comma < 0:
                    next_comma = n
            if next_close < i:
                next_close = text.find("}", i)
                if next_close < 0:
                    raise _Malformed
            end = next_comma if next_comma < next_close else next_close
            if not has_backslash or text.find("\\", i, end) < 0:
                item = text[i:end]
                if item[-1] in _WS:
                    item = item.rstrip(_WS)
                if '"' in item or "{" in item:
                    raise _Malformed
                if len(item) == 4 and item.upper() == "NULL":
                    cur.append(None)
                else:
                    cur.append(item if ident else conv(item))
                i = end
            else:
                # Backslash escapes in an unquoted element: walk it char by char.
                chars: list[str] = []
                keep = 0  # length without trailing unescaped whitespace
                while True:
                    c = text[i]
                    if c == "\\":
                        chars.append(text[i + 1])
                        i += 2
                        keep = len(chars)
                    elif c == "," or c == "}":
                        break
                    else:
                        chars.append(c)
                        i += 1
                        if c not in _WS:
                            keep = len(chars)
                item = "".join(chars[:keep])
                cur.append(item if ident else conv(item))
        # after an element: take the common ',' right here
        if text[i] == ",":
            i += 1
            just_opened = False
        else:
            expect_value = False


class _UseGeneral(Exception):
    pass


_MAX_DIMS = 6  # PostgreSQL's MAXDIM


def _split_rows(
    body: str, depth: int, conv: Converter, ident: bool, bulk: Callable[[str], Any] | None
) -> list[JsonValue]:
    """Elements of unquoted, escape-free, whitespace-free array text without its outer
    braces, e.g. '1,2},{3,4' at depth 2.  ``bulk`` is a C-level equivalent of ``conv``
    for well-formed elements (``int`` for the integer types), tried first."""
    if depth > 1:
        sep = "}" * (depth - 1) + "," + "{" * (depth - 1)
        return [_split_rows(chunk, depth - 1, conv, ident, bulk) for chunk in body.split(sep)]
    items: list[Any] = body.split(",")
    if not items[0] or not items[-1]:
        raise _UseGeneral  # '{}' inside or an empty element: let the full parser judge
    if "N" not in body and "n" not in body:  # no NULL possible (typical for numbers)
        if ident:
            return items
        if bulk is not None:
            try:
                return list(map(bulk, items))
            except Exception:
                pass
        return list(map(conv, items))
    if ident:
        return [None if len(e) == 4 and e.upper() == "NULL" else e for e in items]
    return [
        None if e == "NULL" or (len(e) == 4 and e.upper() == "NULL") else conv(e) for e in items
    ]


def _count_lists(value: JsonValue, depth: int) -> int:
    if depth == 1 or not isinstance(value, list):
        return 1
    total = 1
    for sub in value:
        total += _count_lists(sub, depth - 1)
    return total


def _array_converter(conv: Converter) -> Converter:
    ident = conv is passthrough
    bulk = int if conv is _int else None

    def convert_array(text: str) -> JsonValue:
        try:
            # Fast path: PostgreSQL's array_out text without quoted elements (numbers,
            # booleans, uuids, ...): C-level splits, any number of dimensions.
            if (
                text[0] == "{"
                and '"' not in text
                and "\\" not in text
                and " " not in text
                and text.isprintable()
            ):
                if text[1] != "{":  # one dimension
                    if text[-1] != "}" or text.count("}") != 1 or text.count("{") != 1:
                        return _parse_array(text, conv)
                    if len(text) == 2:
                        return []
                    if ",," in text:
                        return text
                    return _split_rows(text[1:-1], 1, conv, ident, bulk)
                depth = len(text) - len(text.lstrip("{"))
                if depth <= _MAX_DIMS and text.endswith("}" * depth) and ",," not in text:
                    try:
                        out = _split_rows(text[depth:-depth], depth, conv, ident, bulk)
                        lists = _count_lists(out, depth)
                        if lists == text.count("{") == text.count("}"):  # no stray braces
                            return out
                    except _UseGeneral:
                        pass
            return _parse_array(text, conv)
        except Exception:
            return text

    return convert_array


# --------------------------------------------------------------------------- tables

# scalar OID -> (typname, converter, array OID)
_SCALARS: dict[int, tuple[str, Converter, int]] = {
    16: ("bool", _bool, 1000),
    17: ("bytea", _bytea, 1001),
    18: ("char", passthrough, 1002),
    19: ("name", passthrough, 1003),
    20: ("int8", _int, 1016),
    21: ("int2", _int, 1005),
    23: ("int4", _int, 1007),
    25: ("text", passthrough, 1009),
    26: ("oid", _int, 1028),
    114: ("json", _json, 199),
    650: ("cidr", passthrough, 651),
    700: ("float4", _float, 1021),
    701: ("float8", _float, 1022),
    774: ("macaddr8", passthrough, 775),
    790: ("money", passthrough, 791),
    829: ("macaddr", passthrough, 1040),
    869: ("inet", passthrough, 1041),
    1042: ("bpchar", passthrough, 1014),
    1043: ("varchar", passthrough, 1015),
    1082: ("date", passthrough, 1182),
    1083: ("time", passthrough, 1183),
    1114: ("timestamp", _timestamp, 1115),
    1184: ("timestamptz", _timestamptz, 1185),
    1186: ("interval", passthrough, 1187),
    1266: ("timetz", _timetz, 1270),
    1560: ("bit", passthrough, 1561),
    1562: ("varbit", passthrough, 1563),
    1700: ("numeric", passthrough, 1231),
    2950: ("uuid", passthrough, 2951),
    3802: ("jsonb", _jsonb, 3807),
    # Other builtins: text passed through, but their arrays still become lists.
    22: ("int2vector", passthrough, 1006),
    24: ("regproc", passthrough, 1008),
    27: ("tid", passthrough, 1010),
    28: ("xid", passthrough, 1011),
    29: ("cid", passthrough, 1012),
    30: ("oidvector", passthrough, 1013),
    142: ("xml", passthrough, 143),
    600: ("point", passthrough, 1017),
    601: ("lseg", passthrough, 1018),
    602: ("path", passthrough, 1019),
    603: ("box", passthrough, 1020),  # box[] uses ';' as delimiter: left as text below
    604: ("polygon", passthrough, 1027),
    628: ("line", passthrough, 629),
    718: ("circle", passthrough, 719),
    1033: ("aclitem", passthrough, 1034),
    1790: ("refcursor", passthrough, 2201),
    2202: ("regprocedure", passthrough, 2207),
    2203: ("regoper", passthrough, 2208),
    2204: ("regoperator", passthrough, 2209),
    2205: ("regclass", passthrough, 2210),
    2206: ("regtype", passthrough, 2211),
    2970: ("txid_snapshot", passthrough, 2949),
    3220: ("pg_lsn", passthrough, 3221),
    3614: ("tsvector", passthrough, 3643),
    3615: ("tsquery", passthrough, 3645),
    3734: ("regconfig", passthrough, 3735),
    3769: ("regdictionary", passthrough, 3770),
    3904: ("int4range", passthrough, 3905),
    3906: ("numrange", passthrough, 3907),
    3908: ("tsrange", passthrough, 3909),
    3910: ("tstzrange", passthrough, 3911),
    3912: ("daterange", passthrough, 3913),
    3926: ("int8range", passthrough, 3927),
    4072: ("jsonpath", passthrough, 4073),
    4089: ("regnamespace", passthrough, 4090),
    4096: ("regrole", passthrough, 4097),
    4191: ("regcollation", passthrough, 4192),
    4451: ("int4multirange", passthrough, 6150),
    4532: ("nummultirange", passthrough, 6151),
    4533: ("tsmultirange", passthrough, 6152),
    4534: ("tstzmultirange", passthrough, 6153),
    4535: ("datemultirange", passthrough, 6155),
    4536: ("int8multirange", passthrough, 6157),
    5038: ("pg_snapshot", passthrough, 5039),
    5069: ("xid8", passthrough, 271),
}

_NON_COMMA_ARRAYS = frozenset({1020})  # box[]: elements separated by ';'

_CONVERTERS: dict[int, Converter] = {}
_TYPE_NAMES: dict[int, str] = {}
_ARRAY_ELEMENT: dict[int, int] = {}  # array OID -> element OID
for _oid, (_name, _conv, _array_oid) in _SCALARS.items():
    _CONVERTERS[_oid] = _conv
    _TYPE_NAMES[_oid] = _name
    _TYPE_NAMES[_array_oid] = "_" + _name
    _ARRAY_ELEMENT[_array_oid] = _oid
    _CONVERTERS[_array_oid] = (
        passthrough if _array_oid in _NON_COMMA_ARRAYS else _array_converter(_conv)
    )
del _oid, _name, _conv, _array_oid


# --------------------------------------------------------------------------- API


def converter_for(type_oid: int) -> Converter:
    """The converter for a column of type ``type_oid``; unknown OIDs -> :func:`passthrough`.

    Look it up once per column (relation message) and call it per value.  The returned
    callable never raises.
    """
    return _CONVERTERS.get(type_oid, passthrough)


def convert_value(type_oid: int, text: str) -> JsonValue:
    """Convert one text-format value (convenience; prefer :func:`converter_for` in loops)."""
    return _CONVERTERS.get(type_oid, passthrough)(text)


def convert_binary(type_oid: int, data: bytes) -> JsonValue:
    """Convert one binary-format value: for now, the standard base64 text of the raw bytes.

    pgoutput only sends binary values when the subscription asks for ``binary true``,
    which this bridge does not; the type is ignored and this never raises.
    """
    try:
        return b2a_base64(bytes(data), newline=False).decode("ascii")
    except Exception:
        return ""


def type_name(type_oid: int) -> str | None:
    """The builtin ``pg_type.typname`` of ``type_oid`` (``20`` -> ``"int8"``, ``1007`` ->
    ``"_int4"``), or None for OIDs that are not builtin types known here (such as
    extension, enum and composite types, whose names pgoutput sends in Type messages)."""
    return _TYPE_NAMES.get(type_oid)


def array_element_oid(type_oid: int) -> int | None:
    """The element type OID of a known builtin array type, else None."""
    return _ARRAY_ELEMENT.get(type_oid)
