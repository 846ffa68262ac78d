"""Filters and masking (cdc_bridge/filters.py) and their config (tables.*.columns,
exclude_columns, mask, where, ops): pure, no servers."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.config import TableSettings
from cdc_bridge.errors import ConfigError, SetupError
from cdc_bridge.filters import (
    REDACTED,
    ChangeFilters,
    Mask,
    TableFilter,
    build_filters,
    hash_value,
    table_filter,
    truncate_value,
)
from cdc_bridge.provisioning import TableRequest, check_row_filter_support

SALT = "s3cret-salt-0123456789"
COLUMNS = ("id", "email", "name", "notes", "secret")


def table_info(name: str = "users", oid: int = 1) -> TableInfo:
    return TableInfo(
        oid=oid,
        schema="public",
        table=name,
        column_names=COLUMNS,
        converters=tuple(str for _ in COLUMNS),
        type_oids=tuple(25 for _ in COLUMNS),
        key_names=("id",),
        identity_names=frozenset({"id"}),
        replica_identity="f",
    )


def change(
    op: str = "update",
    *,
    after: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
    toast: list[str] | None = None,
    table: TableInfo | None = None,
) -> Change:
    row = after if after is not None else before
    return Change(
        op=op,  # type: ignore[arg-type]
        table=table or table_info(),
        key={"id": row["id"]} if row is not None else None,
        after=after,
        before=before,
        unchanged_toast=toast or [],
        lsn=1,
        commit_lsn=2,
        xid=3,
        commit_ts=4,
        index=0,
    )


def settings(**values: Any) -> TableSettings:
    return TableSettings.model_validate(values)


@pytest.fixture(autouse=True)
def _salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_MASK_SALT", SALT)


# --------------------------------------------------------------------------- masks


def test_hash_is_hex_hmac_sha256_of_the_text() -> None:
    expected = hmac.new(SALT.encode(), b"a@example.com", hashlib.sha256).hexdigest()
    assert hash_value("a@example.com", SALT.encode()) == expected
    assert hash_value(42, SALT.encode()) == hash_value("42", SALT.encode())
    assert hash_value(None, SALT.encode()) is None
    assert hash_value({"b": 1, "a": 2}, b"k") == hash_value({"a": 2, "b": 1}, b"k")


@given(st.text(), st.text(min_size=1), st.text(min_size=1))
def test_hash_is_deterministic_and_depends_on_the_salt(value: str, salt: str, other: str) -> None:
    first = hash_value(value, salt.encode())
    assert first == hash_value(value, salt.encode())
    assert first is not None
    assert len(first) == 64
    assert int(first, 16) >= 0
    if other != salt:
        assert hash_value(value, other.encode()) != first


@given(st.text(), st.integers(min_value=1, max_value=50))
def test_truncate_keeps_whole_characters(value: str, length: int) -> None:
    cut = truncate_value(value, length)
    assert isinstance(cut, str)
    assert value.startswith(cut)
    assert len(cut) == min(len(value), length)
    cut.encode("utf-8")  # never half a character


def test_truncate_of_unicode_and_other_values() -> None:
    assert truncate_value("héllo wörld 🎉🎉", 13) == "héllo wörld 🎉"
    assert truncate_value(None, 3) is None
    assert truncate_value(123456, 3) == "123"
    assert truncate_value({"a": 1}, 4) == '{"a"'


def test_redact_hides_even_null() -> None:
    assert Mask("redact").apply(None) == REDACTED
    assert Mask("redact").apply(17) == REDACTED


def test_mask_repr_never_shows_the_salt() -> None:
    assert SALT not in repr(Mask("hash", salt=SALT.encode()))


# --------------------------------------------------------------------------- tables


def test_table_without_settings_gets_no_filter() -> None:
    assert table_filter(settings()) is None
    assert build_filters({"public.users": settings(subject="x.{op}")}) is None


def test_ops_filter_drops_other_kinds() -> None:
    filters = build_filters({"public.users": settings(ops=["insert", "delete"])})
    assert filters is not None
    assert filters.apply(change("insert", after={"id": 1}))
    assert not filters.apply(change("update", after={"id": 1}))
    assert not filters.apply(change("truncate"))


def test_other_tables_pass_untouched() -> None:
    filters = build_filters({"public.users": settings(exclude_columns=["secret"])})
    assert filters is not None
    other = change(after={"id": 1, "secret": "x"}, table=table_info("orders", oid=2))
    assert filters.apply(other)
    assert other.after == {"id": 1, "secret": "x"}


def test_columns_masks_apply_to_after_before_key_and_toast() -> None:
    compiled = table_filter(
        settings(
            columns=["id", "email", "name", "notes"],
            mask={
                "id": {"hash": {"salt_env": "CDC_MASK_SALT"}},
                "email": {"hash": {"salt_env": "CDC_MASK_SALT"}},
                "name": "redact",
                "notes": {"truncate": 2},
            },
        )
    )
    assert compiled is not None
    row = {"id": 7, "email": "a@b", "name": None, "notes": "hello", "secret": "pw"}
    c = change(after=dict(row), before=dict(row), toast=["secret", "notes"])
    assert compiled.apply(c)
    salt = SALT.encode()
    masked = {"id": hash_value(7, salt), "email": hash_value("a@b", salt), "name": REDACTED}
    assert c.after == {**masked, "notes": "he"}
    assert c.before == c.after
    assert c.key == {"id": hash_value(7, salt)}
    assert c.unchanged_toast == ["notes"]


def test_renamed_table_is_looked_up_again() -> None:
    filters = ChangeFilters({"public.users": TableFilter(exclude=frozenset({"secret"}))})
    assert filters.for_table(table_info("users")) is not None
    assert filters.for_table(table_info("people")) is None  # same OID, new TableInfo


rows = st.dictionaries(
    st.sampled_from(COLUMNS),
    st.one_of(st.none(), st.integers(), st.text(max_size=5)),
).map(lambda r: {"id": 1, **r})


@given(
    after=st.one_of(st.none(), rows),
    before=st.one_of(st.none(), rows),
    toast=st.lists(st.sampled_from(COLUMNS), unique=True),
    excluded=st.sets(st.sampled_from(COLUMNS[1:]), min_size=1),
    include=st.one_of(st.none(), st.sets(st.sampled_from(COLUMNS[1:]))),
)
def test_left_out_columns_never_leak(
    after: dict[str, Any] | None,
    before: dict[str, Any] | None,
    toast: list[str],
    excluded: set[str],
    include: set[str] | None,
) -> None:
    compiled = TableFilter(
        include=None if include is None else frozenset(include | {"id"}),
        exclude=frozenset(excluded),
    )
    c = change(after=after, before=before, toast=toast)
    assert compiled.apply(c)
    left_out = set(COLUMNS) - {"id"} - (set(COLUMNS) if include is None else include) | excluded
    for row in (c.after, c.before, c.key):
        assert row is None or not left_out & row.keys()
    assert not left_out & set(c.unchanged_toast)
    published = set(COLUMNS) - left_out
    if after is not None:
        assert c.after == {k: v for k, v in after.items() if k in published}


# --------------------------------------------------------------------------- config


def test_config_errors_are_one_line_and_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mask": {"email": "blur"}}, "unknown mask 'blur'"),
        ({"mask": {"email": {"sha": 1}}}, "use redact, {hash:"),
        ({"mask": {"email": {"truncate": 0}}}, "greater than or equal to 1"),
        ({"mask": {"email": {"hash": {}}}}, "exactly one of salt_env or salt_file"),
        ({"mask": {"email": {"hash": {"salt_env": "NOPE_UNSET"}}}}, "NOPE_UNSET is not set"),
        ({"mask": {"email": {"hash": {"salt_env": "CDC_BRIDGE_X"}}}}, "reserved"),
        ({"mask": {"email": {"hash": {"salt_env": "SHORT_SALT"}}}}, "at least 16"),
        ({"mask": {"id": "redact"}, "key": ["id"]}, "may only be masked with hash"),
        ({"exclude_columns": ["id"], "key": ["id"]}, "key column 'id' is not published"),
        ({"columns": ["name"], "subject": "u.{email}"}, "subject column 'email'"),
        ({"mask": {"email": "redact"}, "subject": "u.{email}"}, "is redacted"),
        ({"mask": {"secret": "redact"}, "exclude_columns": ["secret"]}, "not published"),
        ({"ops": []}, "at least one"),
        ({"ops": ["insert", "insert"]}, "listed twice"),
        ({"ops": ["upsert"]}, "'insert', 'update', 'delete' or 'truncate'"),
        ({"where": "  "}, "row filter is empty"),
    ]
    monkeypatch.setenv("SHORT_SALT", "short")
    for table, needle in cases:
        with pytest.raises(ConfigError) as raised:
            load(monkeypatch, table)
        message = str(raised.value)
        assert needle in message, (table, message)
        assert "\n" not in message
        assert "tables.public.users" in message


def test_hash_salt_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    salt_file = tmp_path / "salt"
    salt_file.write_text(SALT + "\n", encoding="utf-8")
    loaded = load(monkeypatch, {"mask": {"email": {"hash": {"salt_file": str(salt_file)}}}})
    compiled = table_filter(loaded.tables["public.users"])
    assert compiled is not None
    assert compiled.masks is not None
    assert compiled.masks["email"].apply("x") == hash_value("x", SALT.encode())
    with pytest.raises(ConfigError, match="cannot read salt_file"):
        load(monkeypatch, {"mask": {"email": {"hash": {"salt_file": str(tmp_path / "no")}}}})


def load(monkeypatch: pytest.MonkeyPatch, table: dict[str, Any]) -> Any:
    from cdc_bridge.config import load_settings

    for name in ("CDC_BRIDGE_CONFIG", "CDC_BRIDGE_SECRETS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDC_BRIDGE_POSTGRES__DSN", "postgresql://u@h/db")
    import json

    monkeypatch.setenv("CDC_BRIDGE_TABLES", json.dumps({"public.users": table}))
    return load_settings()


# --------------------------------------------------------------------------- start-up


def test_row_filters_need_postgresql_15() -> None:
    requests = {
        "public.a": TableRequest("x.{op}", None),
        "public.users": TableRequest("x.{op}", None, where="role <> 'system'"),
    }
    with pytest.raises(SetupError) as raised:
        check_row_filter_support(140011, requests)
    assert str(raised.value) == (
        "tables.public.users.where needs PostgreSQL 15 or newer (publication row filters), "
        "but the server is PostgreSQL 14: remove the key, or upgrade"
    )
    check_row_filter_support(150000, requests)
    check_row_filter_support(140011, {"public.a": TableRequest("x.{op}", None)})


# --------------------------------------------------------------------------- envelopes

_INT8, _TIMESTAMPTZ, _JSONB = 20, 1184, 3802


def _typed_table() -> TableInfo:
    names = ("id", "email", "born", "prefs", "secret")
    oids = (_INT8, 25, _TIMESTAMPTZ, _JSONB, 25)
    return TableInfo(
        oid=9,
        schema="public",
        table="users",
        column_names=names,
        converters=tuple(str for _ in names),
        type_oids=oids,
        key_names=("id",),
        identity_names=frozenset(names),  # REPLICA IDENTITY FULL
        replica_identity="f",
    )


def test_published_view_hides_left_out_columns_and_types_masks_as_text() -> None:
    compiled = table_filter(
        settings(
            exclude_columns=["secret"],
            mask={"born": "redact", "prefs": {"truncate": 4}},
        )
    )
    assert compiled is not None
    view = compiled.view(_typed_table())
    assert view.column_names == ("id", "email", "born", "prefs")
    assert view.type_oids == (_INT8, 25, 25, 25)
    assert view.identity_names == frozenset(view.column_names)
    assert view.key_names == ("id",)


@pytest.mark.parametrize("envelope", ["native", "wal2json", "debezium"])
def test_no_envelope_shows_a_left_out_column(envelope: str) -> None:
    from cdc_bridge.envelopes import encoder_for

    filters = build_filters(
        {
            "public.users": settings(
                exclude_columns=["secret"],
                mask={
                    "id": {"hash": {"salt_env": "CDC_MASK_SALT"}},
                    "born": "redact",
                    "prefs": {"truncate": 4},
                },
            )
        }
    )
    assert filters is not None
    encode = encoder_for(envelope)  # type: ignore[arg-type]
    table = _typed_table()
    row = {
        "id": 5,
        "email": "e@x",
        "born": "1990-01-01T00:00:00Z",
        "prefs": {"theme": "dark"},
        "secret": "hunter2",
    }
    for op in ("insert", "update", "delete"):
        c = change(
            op,
            after=None if op == "delete" else dict(row),
            before=None if op == "insert" else dict(row),
            toast=["secret"],
            table=table,
        )
        assert filters.apply(c)
        assert c.table is filters.published_table(table)
        body = encode(c, "slot")
        assert b"secret" not in body
        assert b"hunter2" not in body
        assert b"1990" not in body
        assert b"dark" not in body
        assert str(hash_value(5, SALT.encode())).encode() in body


def test_a_table_renamed_while_streaming_keeps_its_filter() -> None:
    filters = build_filters({"public.users": settings(exclude_columns=["secret"])})
    assert filters is not None
    renamed = dataclasses.replace(table_info("members"), config_name="public.users")
    published = change("insert", after={"id": 1, "secret": "x"}, table=renamed)
    assert filters.apply(published)
    assert published.after == {"id": 1}
    assert "secret" not in filters.published_table(renamed).column_names
    # A table that only shares the new name is not the configured one.
    stranger = change("insert", after={"id": 1, "secret": "x"}, table=table_info("members", 2))
    assert filters.apply(stranger)
    assert stranger.after == {"id": 1, "secret": "x"}
