"""The ``conversations`` workload every contender reads: schema, sizes and change mix.

Rows look like the first user's chat messages: a uuid conversation, a role, content
of 50 B to 4 kB (log-uniform) with a share of rows above 8 kB so that PostgreSQL stores
them out of line (TOAST; the text is hex of md5 sums, which pglz cannot compress), and
a jsonb ``metadata`` object. Updates touch ``metadata`` and ``updated_at`` only, so
toasted ``content`` arrives as an *unchanged TOAST* value; deletes remove the oldest
live rows. Each statement affects exactly the rows it names, so the number of changes
written is exact and known in advance.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import psycopg

__all__ = ["SCHEMA_SQL", "Mix", "Workload", "create_schema"]

TABLE = "conversations"
PUBLICATION = "bench_pub"

SCHEMA_SQL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " id bigserial PRIMARY KEY,"
    " conversation_uuid uuid NOT NULL,"
    " role text NOT NULL,"
    " content text NOT NULL,"
    " metadata jsonb NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz)",
    # Incompressible text of exactly n characters (hex of md5 sums).
    "CREATE OR REPLACE FUNCTION bench_text(n int) RETURNS text LANGUAGE sql VOLATILE AS "
    "$$ SELECT left(string_agg(md5(random()::text || g::text), ''), n) "
    "FROM generate_series(0, n / 32) g $$",
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}",
)

# %(n)s rows; content 50 B..4 kB log-uniform, a share %(toast)s of 8.5..16 kB.
_INSERT_SQL = (
    f"INSERT INTO {TABLE} (conversation_uuid, role, content, metadata) "
    "SELECT gen_random_uuid(), (ARRAY['user','assistant','system'])[1 + (g %% 3)], "
    " bench_text(CASE WHEN random() < %(toast)s THEN 8500 + (random() * 7500)::int "
    "  ELSE (50 * power(80, random()))::int END), "
    " jsonb_build_object('model', 'gpt-x', 'tokens', (random() * 900)::int, "
    "  'tags', jsonb_build_array('a', 'b'), 'n', g, 'nested', jsonb_build_object('k', null)) "
    "FROM generate_series(1, %(n)s) g"
)
_UPDATE_SQL = (
    f"UPDATE {TABLE} SET metadata = metadata || jsonb_build_object('edited', true, "
    "'v', (random() * 100)::int), updated_at = now() WHERE id = ANY(%(ids)s)"
)
_DELETE_SQL = f"DELETE FROM {TABLE} WHERE id = ANY(%(ids)s)"


def create_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The table, the text generator and the publication (idempotent but the last)."""
    for statement in SCHEMA_SQL:
        conn.execute(statement)


@dataclass(frozen=True)
class Mix:
    """Shares of inserts, updates and deletes (they need not sum to 1; normalised)."""

    insert: float = 0.8
    update: float = 0.15
    delete: float = 0.05

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``"80/15/5"`` → Mix(0.8, 0.15, 0.05)."""
        parts = [float(p) for p in text.split("/")]
        if len(parts) != 3 or sum(parts) <= 0 or min(parts) < 0:
            raise ValueError(f"mix {text!r}: want INSERT/UPDATE/DELETE shares, e.g. 80/15/5")
        total = sum(parts)
        return cls(parts[0] / total, parts[1] / total, parts[2] / total)

    def __str__(self) -> str:
        return f"{self.insert:.0%}/{self.update:.0%}/{self.delete:.0%}"


class Workload:
    """Writes transactions of an exact number of changes; tracks the live id range.

    Ids come from a fresh bigserial, so the live rows are ``(deleted_upto, max_id]``
    minus nothing: deletes always take the oldest live rows.
    """

    def __init__(self, dsn: str, *, mix: Mix, toast_share: float = 0.02, seed: int = 7) -> None:
        self.dsn = dsn
        self.mix = mix
        self.toast_share = toast_share
        self.rng = random.Random(seed)
        self.conn = psycopg.connect(dsn, autocommit=True)
        row = self.conn.execute(f"SELECT coalesce(max(id), 0), coalesce(min(id), 1) FROM {TABLE}")
        max_id, min_id = row.fetchone() or (0, 1)
        self.max_id = int(str(max_id))
        self.deleted_upto = int(str(min_id)) - 1
        self.changes = 0
        self.transactions = 0

    def close(self) -> None:
        self.conn.close()

    def _split(self, size: int) -> tuple[int, int, int]:
        live = self.max_id - self.deleted_upto
        if size == 1:  # one change: draw its kind
            r = self.rng.random()
            kind = 0 if r < self.mix.insert else 1 if r < self.mix.insert + self.mix.update else 2
            counts = [0, 0, 0]
            counts[kind] = 1
            _, upd, dele = counts
        else:
            upd = round(size * self.mix.update)
            dele = round(size * self.mix.delete)
        # Updates and deletes need live rows that this transaction does not also delete.
        dele = min(dele, max(live - 1, 0))
        upd = min(upd, max(live - dele, 0))
        return size - upd - dele, upd, dele

    def transaction(self, size: int) -> None:
        """One transaction of exactly `size` row changes."""
        ins, upd, dele = self._split(size)
        with self.conn.transaction():
            if dele:
                ids = list(range(self.deleted_upto + 1, self.deleted_upto + 1 + dele))
                self.conn.execute(_DELETE_SQL, {"ids": ids})
                self.deleted_upto += dele
            if upd:
                low = self.deleted_upto + 1
                ids = self.rng.sample(range(low, self.max_id + 1), upd)
                self.conn.execute(_UPDATE_SQL, {"ids": ids})
            if ins:
                self.conn.execute(_INSERT_SQL, {"n": ins, "toast": self.toast_share})
                self.max_id += ins
        self.changes += size
        self.transactions += 1

    def write(self, changes: int, tx_size: int) -> float:
        """`changes` changes in transactions of `tx_size`; returns seconds taken."""
        started = time.monotonic()
        left = changes
        while left > 0:
            size = min(tx_size, left)
            self.transaction(size)
            left -= size
        return time.monotonic() - started

    def steady(self, rate: float, seconds: float, tx_size: int) -> int:
        """`rate` changes/s for `seconds`, in transactions of `tx_size`, paced: exactly
        round(rate * seconds / tx_size) transactions, each started on its schedule
        (or at once when behind)."""
        interval = tx_size / rate
        started = time.monotonic()
        transactions = round(rate * seconds / tx_size)
        for number in range(transactions):
            delay = started + number * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.transaction(tx_size)
        return transactions * tx_size
