"""Tests for cdc_bridge.lsn: PostgreSQL's ``X/X`` LSN text form <-> int."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.lsn import INVALID_LSN, format_lsn, parse_lsn

MAX_LSN = 2**64 - 1

KNOWN = [
    ("0/0", 0),
    ("0/1", 1),
    ("0/16B3748", 0x16B3748),
    ("16/B374D848", 0x16_B374D848),
    ("1/0", 1 << 32),
    ("0/FFFFFFFF", 0xFFFFFFFF),
    ("FFFFFFFF/FFFFFFFF", MAX_LSN),
    ("ABCDEF01/2345678", 0xABCDEF01_02345678),
]


@pytest.mark.parametrize(("text", "value"), KNOWN)
def test_parse_known_values(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize(("text", "value"), KNOWN)
def test_format_known_values(text: str, value: int) -> None:
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/16b3748", 0x16B3748),  # lower case hex
        ("16/b374d848", 0x16_B374D848),
        ("00000000/016B3748", 0x16B3748),  # leading zeros, 8 digits per half
        ("  0/16B3748\n", 0x16B3748),  # surrounding whitespace (psql output)
    ],
)
def test_parse_accepts_other_spellings(text: str, value: int) -> None:
    assert parse_lsn(text) == value


def test_invalid_lsn_is_zero() -> None:
    assert INVALID_LSN == 0
    assert format_lsn(INVALID_LSN) == "0/0"


@given(st.integers(min_value=0, max_value=MAX_LSN))
def test_format_then_parse_round_trips(value: int) -> None:
    text = format_lsn(value)
    assert parse_lsn(text) == value
    high, low = text.split("/")
    # PostgreSQL's own spelling: upper case, no leading zeros, at most 8 digits a half.
    assert high == f"{value >> 32:X}"
    assert low == f"{value & 0xFFFFFFFF:X}"


@given(
    st.integers(min_value=0, max_value=0xFFFFFFFF), st.integers(min_value=0, max_value=0xFFFFFFFF)
)
def test_parse_then_format_round_trips(high: int, low: int) -> None:
    text = f"{high:X}/{low:X}"
    value = parse_lsn(text)
    assert value == (high << 32) | low
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "/",
        "0",
        "16B3748",
        "0/",
        "/0",
        "0//1",
        "0/1/2",
        "g/0",
        "0/xyz",
        "0x1/0",
        "0/0x1",
        "-1/0",
        "1/-1",
        "+1/0",
        "0/+1",
        "0_1/0",
        "1/ 2",
        "1 /2",
        "1/2 3",
        "123456789/0",  # 9 hex digits in a half
        "0/123456789",
        "\u0661/0",  # ARABIC-INDIC DIGIT ONE: int() takes it, an LSN may not
        "0/\uff11",  # FULLWIDTH DIGIT ONE
        "0.1",
        "0:1",
    ],
)
def test_parse_rejects_invalid_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not an LSN: ") as info:
        parse_lsn(text)
    assert str(info.value) == (f"not an LSN: {text!r} (expected two hex halves like '0/16B3748')")


@given(st.text(max_size=20))
def test_parse_never_returns_out_of_range(text: str) -> None:
    try:
        value = parse_lsn(text)
    except ValueError:
        return
    assert 0 <= value <= MAX_LSN
    assert parse_lsn(format_lsn(value)) == value


@pytest.mark.parametrize("value", [-1, MAX_LSN + 1, -(2**64), 2**70])
def test_format_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match=rf"^LSN out of range: {value}$"):
        format_lsn(value)
