"""config/example.yaml stays true: it loads, documents every key of Settings, and shows
the default of every key whose value it does not deliberately change.

The model is walked, not listed here, so a key added to cdc_bridge/config.py without a
matching entry in the example fails these tests.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cdc_bridge.config import NatsSettings, Settings, TableSettings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.yaml"

#: Keys whose example value deliberately differs from the default (or that have none).
#: ``*`` stands for any table name. Every other key shown in the example has its default.
DELIBERATE_OVERRIDES = frozenset({"postgres.dsn", "nats.stream", "tables.*.subject"})

#: Keys whose value must name an existing file (checked when the settings load).
EXISTING_FILE_KEYS = frozenset(
    {
        "postgres.sslrootcert",
        "postgres.sslcert",
        "postgres.sslkey",
        "nats.creds_file",
        "nats.nkey_seed_file",
        "nats.tls_ca_file",
        "nats.tls_cert_file",
        "nats.tls_key_file",
    }
)

#: NATS authentication keys shown commented out of which only one may be set at a time
#: (besides user/password, the first).
NATS_AUTH_ALTERNATIVES = (("user", "password"), ("token",), ("creds_file",), ("nkey_seed_file",))

# A commented-out key: "# name: value" at the key's own indentation. Prose comments
# must not start with a setting's name followed by ':'.
_COMMENTED_KEY = re.compile(r"^(?P<indent> *)# (?P<name>[A-Za-z_][A-Za-z0-9_]*):(?P<rest> .*)?$")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own CDC_BRIDGE_* variables out of these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CDC_BRIDGE_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- the model


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """("section", Model) for a nested model, ("mapping", Model) for dict[str, Model]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section", annotation
    origin = get_origin(annotation)
    if origin is dict:
        value = get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return "mapping", value
    if origin is Union or origin is types.UnionType:
        for arg in get_args(annotation):
            if arg is not type(None) and _nested(arg) is not None:
                raise AssertionError(f"optional sections are not handled here: {annotation}")
    return None


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every key of the model, as dotted paths ("postgres.dsn", "tables.*.subject")."""
    leaves: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation)
        if nested is None:
            leaves[prefix + name] = field
        elif nested[0] == "section":
            leaves |= _leaf_fields(nested[1], f"{prefix}{name}.")
        else:
            leaves |= _leaf_fields(nested[1], f"{prefix}{name}.*.")
    return leaves


def _field_names(model: type[BaseModel]) -> set[str]:
    return {path.rsplit(".", 1)[-1] for path in _leaf_fields(model)} | set(model.model_fields)


def _mapping_fields(model: type[BaseModel]) -> list[str]:
    return [
        name
        for name, field in model.model_fields.items()
        if (nested := _nested(field.annotation)) and nested[0] == "mapping"
    ]


# --------------------------------------------------------------------------- the example


def _uncomment(text: str, names: set[str]) -> str:
    """The example with every commented-out key ("# name: value") made active."""
    lines = []
    for line in text.splitlines():
        match = _COMMENTED_KEY.match(line)
        if match and match["name"] in names:
            line = f"{match['indent']}{match['name']}:{match['rest'] or ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _present(
    data: Mapping[str, Any] | None, model: type[BaseModel], prefix: str = ""
) -> list[tuple[str, Any]]:
    """(path, value) of every key set in ``data``, paths as in :func:`_leaf_fields`."""
    found: list[tuple[str, Any]] = []
    for key, value in (data or {}).items():
        field = model.model_fields.get(key)
        assert field is not None, f"{prefix}{key} is not a setting"
        nested = _nested(field.annotation)
        if nested is None:
            found.append((prefix + key, value))
        elif nested[0] == "section":
            found += _present(value, nested[1], f"{prefix}{key}.")
        else:
            for entry in (value or {}).values():
                found += _present(entry, nested[1], f"{prefix}{key}.*.")
    return found


def _undocumented(model: type[BaseModel], text: str) -> list[str]:
    """Keys of the model that appear in the example neither active nor commented out."""
    shown = {
        path for path, _ in _present(yaml.safe_load(_uncomment(text, _field_names(model))), model)
    }
    return sorted(set(_leaf_fields(model)) - shown)


def _env_name(path: str) -> str:
    return "CDC_BRIDGE_" + path.replace(".", "__").upper()


def _env_undocumented(model: type[BaseModel], text: str) -> list[str]:
    """Environment variables of the model's keys that the example does not mention."""
    keys = [path for path in _leaf_fields(model) if "*" not in path] + _mapping_fields(model)
    return sorted(
        _env_name(path)
        for path in keys
        if not re.search(rf"env: {re.escape(_env_name(path))}\b", text)
    )


def _not_default(model: type[BaseModel], text: str) -> list[str]:
    """Active keys whose value is not the default and is not a deliberate override."""
    fields = _leaf_fields(model)
    wrong = []
    for path, value in _present(yaml.safe_load(text), model):
        if path in DELIBERATE_OVERRIDES:
            continue
        default = fields[path].get_default(call_default_factory=True)
        if default is PydanticUndefined or value != default:
            wrong.append(f"{path}: {value!r} (default {default!r})")
    return wrong


@pytest.fixture(scope="module")
def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the tests


def test_example_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.postgres.dsn.get_secret_value() == "postgresql://cdc@db.example:5432/app"
    assert settings.postgres.slot == "cdc_bridge"
    assert settings.postgres.publication == "cdc_bridge"
    assert settings.nats.url == "nats://127.0.0.1:4222"
    assert settings.nats.stream == "conversational-memory"
    assert list(settings.tables) == ["public.conversations"]
    assert settings.tables["public.conversations"].subject == "messages.{conversation_uuid}"


def test_commented_out_examples_are_valid(tmp_path: Path, example_text: str) -> None:
    uncommented = _uncomment(example_text, _field_names(Settings))
    assert uncommented != example_text, "the optional keys should be shown commented out"
    # Keys naming files must name existing ones: the example's paths exist only where
    # the bridge is deployed, so they are swapped for files made here.
    data = yaml.safe_load(uncommented)
    for key in EXISTING_FILE_KEYS:
        section, name = key.split(".")
        if name in data.get(section, {}):
            stand_in = tmp_path / f"{section}_{name}.pem"
            stand_in.write_text("stand-in\n", encoding="utf-8")
            data[section][name] = str(stand_in)
    # Each way to authenticate to NATS on its own: they exclude each other.
    for keep in NATS_AUTH_ALTERNATIVES:
        assert all(key in data["nats"] for key in keep), f"nats.{keep} not shown"
        variant = {**data, "nats": dict(data["nats"])}
        for other in NATS_AUTH_ALTERNATIVES:
            if other != keep:
                for key in other:
                    del variant["nats"][key]
        path = tmp_path / "uncommented.yaml"
        path.write_text(yaml.safe_dump(variant), encoding="utf-8")
        load_settings(path)


def test_every_key_is_documented(example_text: str) -> None:
    assert _undocumented(Settings, example_text) == []


def test_every_environment_variable_is_named(example_text: str) -> None:
    assert _env_undocumented(Settings, example_text) == []


def test_values_are_the_defaults_unless_deliberate(example_text: str) -> None:
    assert _not_default(Settings, example_text) == []


def test_deliberate_overrides_are_real(example_text: str) -> None:
    fields = _leaf_fields(Settings)
    active = dict(_present(yaml.safe_load(example_text), Settings))
    for path in DELIBERATE_OVERRIDES:
        assert path in fields, f"{path} is not a setting"
        assert path in active, f"{path} is listed as overridden but is not set in the example"
        default = fields[path].get_default(call_default_factory=True)
        assert active[path] != default, f"{path} has its default: drop it from the overrides"


# --------------------------------------------------------------- the checks can fail


class _NatsWithNewKey(NatsSettings):
    new_knob: int = 7


class _TableWithNewKey(TableSettings):
    new_column_option: str = "x"


# Settings as it would be with three more keys; create_model because a subclass may not
# narrow the type of ``tables`` (dict is invariant).
_SettingsWithNewKeys = create_model(
    "_SettingsWithNewKeys",
    __base__=Settings,
    nats=(_NatsWithNewKey, _NatsWithNewKey()),
    tables=(dict[str, _TableWithNewKey], Field(min_length=1)),
    new_top_level=(bool, False),
)


def test_a_new_key_without_documentation_is_caught(example_text: str) -> None:
    assert _undocumented(_SettingsWithNewKeys, example_text) == [
        "nats.new_knob",
        "new_top_level",
        "tables.*.new_column_option",
    ]
    assert _env_undocumented(_SettingsWithNewKeys, example_text) == [
        "CDC_BRIDGE_NATS__NEW_KNOB",
        "CDC_BRIDGE_NEW_TOP_LEVEL",
    ]


def test_a_new_key_documented_active_or_commented_passes(example_text: str) -> None:
    text = example_text.replace(
        "  url: ", "  # env: CDC_BRIDGE_NATS__NEW_KNOB\n  # new_knob: 9\n  url: "
    ).replace(
        "log_level: INFO",
        "log_level: INFO\n# env: CDC_BRIDGE_NEW_TOP_LEVEL\nnew_top_level: false",
    )
    text = text.replace("    # key: [id]", "    # key: [id]\n    new_column_option: x")
    assert _undocumented(_SettingsWithNewKeys, text) == []
    assert _env_undocumented(_SettingsWithNewKeys, text) == []
    assert _not_default(_SettingsWithNewKeys, text) == []


def test_a_value_other_than_the_default_is_caught(example_text: str) -> None:
    assert "  replicas: 1\n" in example_text
    text = example_text.replace("  replicas: 1\n", "  replicas: 3\n").replace(
        "log_level: INFO", "log_level: INFO\nnew_top_level: true"
    )
    assert _not_default(_SettingsWithNewKeys, text) == [
        "nats.replicas: 3 (default 1)",
        "new_top_level: True (default False)",
    ]


def test_a_required_key_must_be_a_deliberate_override() -> None:
    class _WithRequired(NatsSettings):
        required_knob: str

    class _Root(BaseModel):
        nats: _WithRequired

    assert _not_default(_Root, "nats:\n  required_knob: abc\n") == [
        f"nats.required_knob: 'abc' (default {PydanticUndefined!r})"
    ]
