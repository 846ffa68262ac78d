"""PostgreSQL type names as ``format_type`` prints them, from a type OID and modifier.

wal2json names every column's type with ``format_type`` (``"character varying(20)"``,
``"timestamp with time zone"``, ``"integer[]"``); pgoutput's Relation message carries only
the OID and the type modifier. The built-in types have fixed OIDs, so their names are a
table here, and the modifier rules (length, precision, scale, interval fields) are those
of PostgreSQL's ``format_type_extended`` and the types' ``typmodout`` functions. Checked
against a real server's ``format_type`` in tests/test_pgtypes.py.

Types that are not built in (enums, domains, composites, extension types such as citext)
get an OID assigned at creation, so no table can hold their names: :func:`format_type`
returns None for them and the caller decides.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from cdc_bridge.values import array_element_oid

__all__ = ["format_type"]

#: format_type(oid, NULL) of the built-in types.
_NAMES: Final[dict[int, str]] = {
    16: "boolean",
    17: "bytea",
    18: '"char"',
    19: "name",
    20: "bigint",
    21: "smallint",
    22: "int2vector",
    23: "integer",
    24: "regproc",
    25: "text",
    26: "oid",
    27: "tid",
    28: "xid",
    29: "cid",
    30: "oidvector",
    114: "json",
    142: "xml",
    600: "point",
    601: "lseg",
    602: "path",
    603: "box",
    604: "polygon",
    628: "line",
    650: "cidr",
    700: "real",
    701: "double precision",
    718: "circle",
    774: "macaddr8",
    790: "money",
    829: "macaddr",
    869: "inet",
    1033: "aclitem",
    1042: "character",
    1043: "character varying",
    1082: "date",
    1083: "time without time zone",
    1114: "timestamp without time zone",
    1184: "timestamp with time zone",
    1186: "interval",
    1266: "time with time zone",
    1560: "bit",
    1562: "bit varying",
    1700: "numeric",
    1790: "refcursor",
    2202: "regprocedure",
    2203: "regoper",
    2204: "regoperator",
    2205: "regclass",
    2206: "regtype",
    2950: "uuid",
    2970: "txid_snapshot",
    3220: "pg_lsn",
    3614: "tsvector",
    3615: "tsquery",
    3734: "regconfig",
    3769: "regdictionary",
    3802: "jsonb",
    3904: "int4range",
    3906: "numrange",
    3908: "tsrange",
    3910: "tstzrange",
    3912: "daterange",
    3926: "int8range",
    4072: "jsonpath",
    4089: "regnamespace",
    4096: "regrole",
    4191: "regcollation",
    4451: "int4multirange",
    4532: "nummultirange",
    4533: "tsmultirange",
    4534: "tstzmultirange",
    4535: "datemultirange",
    4536: "int8multirange",
    5038: "pg_snapshot",
    5069: "xid8",
}

_VARHDRSZ: Final = 4
_BPCHAR, _VARCHAR, _NUMERIC = 1042, 1043, 1700
_BIT, _VARBIT = 1560, 1562
_TIME, _TIMETZ, _TIMESTAMP, _TIMESTAMPTZ, _INTERVAL = 1083, 1266, 1114, 1184, 1186
_ZONED: Final = {
    _TIME: ("time", "without time zone"),
    _TIMETZ: ("time", "with time zone"),
    _TIMESTAMP: ("timestamp", "without time zone"),
    _TIMESTAMPTZ: ("timestamp", "with time zone"),
}

# Interval field masks (src/include/utils/datetime.h) -> intervaltypmodout's text.
_YEAR, _MONTH, _DAY = 1 << 2, 1 << 1, 1 << 3
_HOUR, _MINUTE, _SECOND = 1 << 10, 1 << 11, 1 << 12
_INTERVAL_FULL_RANGE: Final = 0x7FFF
_INTERVAL_FULL_PRECISION: Final = 0xFFFF
_INTERVAL_FIELDS: Final[dict[int, str]] = {
    _YEAR: " year",
    _MONTH: " month",
    _DAY: " day",
    _HOUR: " hour",
    _MINUTE: " minute",
    _SECOND: " second",
    _YEAR | _MONTH: " year to month",
    _DAY | _HOUR: " day to hour",
    _DAY | _HOUR | _MINUTE: " day to minute",
    _DAY | _HOUR | _MINUTE | _SECOND: " day to second",
    _HOUR | _MINUTE: " hour to minute",
    _HOUR | _MINUTE | _SECOND: " hour to second",
    _MINUTE | _SECOND: " minute to second",
    _INTERVAL_FULL_RANGE: "",
}


def _with_modifier(type_oid: int, typmod: int) -> str | None:
    """The name with its modifier (``typmod >= 0``) for the types that have one."""
    if type_oid == _BPCHAR:
        return f"character({typmod - _VARHDRSZ})"
    if type_oid == _VARCHAR:
        return f"character varying({typmod - _VARHDRSZ})"
    if type_oid == _NUMERIC:
        value = typmod - _VARHDRSZ
        precision = (value >> 16) & 0xFFFF
        scale = ((value & 0x7FF) ^ 1024) - 1024  # sign-extended 11 bits (PG 15+)
        return f"numeric({precision},{scale})"
    if type_oid == _BIT:
        return f"bit({typmod})"
    if type_oid == _VARBIT:
        return f"bit varying({typmod})"
    zoned = _ZONED.get(type_oid)
    if zoned is not None:
        return f"{zoned[0]}({typmod}) {zoned[1]}"
    if type_oid == _INTERVAL:
        fields = _INTERVAL_FIELDS.get((typmod >> 16) & 0x7FFF)
        if fields is None:
            return None
        precision = typmod & 0xFFFF
        suffix = "" if precision == _INTERVAL_FULL_PRECISION else f"({precision})"
        return f"interval{fields}{suffix}"
    return None


def format_type(type_oid: int, typmod: int | None = None) -> str | None:
    """``format_type(type_oid, typmod)`` for built-in types (and arrays of them), else None.

    ``typmod`` None names the type without a modifier, like ``format_type(oid, NULL)``;
    ``-1`` is "no modifier given", which differs from None only for ``bpchar``.
    """
    element = array_element_oid(type_oid)
    if element is not None:
        name = format_type(element, typmod)
        return None if name is None else f"{name}[]"
    if typmod is not None and typmod >= 0:
        named = _with_modifier(type_oid, typmod)
        if named is not None:
            return named
    if typmod is not None and type_oid == _BPCHAR:
        # bpchar without a length is not character(1): format_type says bpchar.
        return "bpchar"
    return _NAMES.get(type_oid)
