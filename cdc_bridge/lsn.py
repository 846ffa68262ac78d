"""Log sequence numbers: PostgreSQL's 64-bit WAL positions and their text form.

PostgreSQL prints an LSN as two hex halves, ``"16/B374D848"``; everything inside the
bridge works on plain ints wrapped in a NewType so the two never get mixed up.
"""

import re
from typing import NewType

__all__ = ["INVALID_LSN", "Lsn", "format_lsn", "parse_lsn"]

Lsn = NewType("Lsn", int)

INVALID_LSN = Lsn(0)

_MAX_LSN = (1 << 64) - 1

# Exactly 1-8 ASCII hex digits per half: int(x, 16) alone would also take a sign,
# underscores, a 0x prefix, inner spaces and non-ASCII digits.
_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> Lsn:
    """Parse ``"XXX/XXX"`` into an :data:`Lsn`; raise ``ValueError`` on anything else."""
    match = _LSN_TEXT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r} (expected two hex halves like '0/16B3748')")
    return Lsn((int(match[1], 16) << 32) | int(match[2], 16))


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it: ``format_lsn(0x16B3748) == "0/16B3748"``."""
    if not 0 <= lsn <= _MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
