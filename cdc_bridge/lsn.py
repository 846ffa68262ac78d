"""Log sequence numbers: PostgreSQL's 64-bit WAL positions and their text form.

PostgreSQL prints an LSN as two hex halves, ``"16/B374D848"``; everything inside the
bridge works on plain ints wrapped in a NewType so the two never get mixed up.
"""

from typing import NewType

__all__ = ["INVALID_LSN", "Lsn", "format_lsn", "parse_lsn"]

Lsn = NewType("Lsn", int)

INVALID_LSN = Lsn(0)

_MAX_LSN = (1 << 64) - 1


def parse_lsn(text: str) -> Lsn:
    """Parse ``"XXX/XXX"`` into an :data:`Lsn`; raise ``ValueError`` on anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {text!r} (expected two hex halves like '0/16B3748')")
    try:
        return Lsn((int(high, 16) << 32) | int(low, 16))
    except ValueError:
        raise ValueError(f"not an LSN: {text!r} (expected two hex halves like '0/16B3748')") from None


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it: ``format_lsn(0x16B3748) == "0/16B3748"``."""
    if not 0 <= lsn <= _MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
