"""The config file: parsing and validation without a database."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_hooks.config import (
    DEFAULT_EVENTS,
    Config,
    DeliveryConfig,
    HookConfig,
    TableName,
    config_path,
    load_config,
    parse_config,
    parse_table_name,
)
from cdc_hooks.errors import ConfigError

ISSUE_EXAMPLE = """
[database]
dsn = "postgresql://app@localhost/app"   # CDC_HOOKS_DSN overrides it

[[hooks]]
name = "person"
table = "public.person"
events = ["insert", "update"]
provides = ["name", "address"]

[[hooks]]
name = "myhook"
provides = ["name", "address"]
"""


def parse(text: str) -> Config:
    return parse_config(tomllib.loads(text))


def hook(text: str) -> HookConfig:
    return parse("[[hooks]]\n" + text).hooks[0]


def test_issue_example(tmp_path: Path) -> None:
    path = tmp_path / "cdc_hooks.toml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_config(path)
    assert config.dsn == "postgresql://app@localhost/app"
    assert config.path == path
    person, custom = config.hooks
    assert person == HookConfig("person", TableName("public", "person"), ("insert", "update"),
                                ("name", "address"))
    assert not person.is_custom
    assert custom.is_custom and custom.provides == ("name", "address") and custom.table is None
    assert config.hook("myhook") is custom
    assert config.delivery == DeliveryConfig()


def test_defaults() -> None:
    person = hook('name = "person"\ntable = "person"')
    assert person.table == TableName("public", "person")
    assert person.events == DEFAULT_EVENTS == ("insert", "update")
    assert person.provides is None  # every column but the key, resolved at install
    assert person.key is None  # the primary key
    assert person.when_changed is None  # any provided column
    assert parse("") == Config()


def test_all_hook_keys() -> None:
    h = hook('name = "p"\ntable = "p"\nevents = ["update", "delete"]\nprovides = ["a", "b"]\n'
             'key = ["id", "tenant"]\nwhen_changed = ["b"]')
    assert h.events == ("update", "delete")
    assert h.key == ("id", "tenant")
    assert h.when_changed == ("b",)


def test_unknown_hook_lookup_lists_the_hooks() -> None:
    config = parse(ISSUE_EXAMPLE)
    with pytest.raises(ConfigError, match='unknown hook "nope" \\(hooks: person, myhook\\)'):
        config.hook("nope")
    with pytest.raises(ConfigError, match="none declared"):
        Config().hook("x")


# Table names ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("person", TableName("public", "person")),
    ("public.person", TableName("public", "person")),
    ("Sales.Orders", TableName("sales", "orders")),  # unquoted names fold to lower case
    ('public."People"', TableName("public", "People")),
    ('"People"', TableName("public", "People")),
    ('"My Schema"."Odd ""Name"""', TableName("My Schema", 'Odd "Name"')),
    ('"a.b".c', TableName("a.b", "c")),
    ("t$1", TableName("public", "t$1")),
    ("_x", TableName("public", "_x")),
])
def test_table_names(text: str, expected: TableName) -> None:
    assert parse_table_name(text) == expected
    assert parse_table_name(str(expected)) == expected


def test_table_name_is_printed_as_sql_would_read_it() -> None:
    assert str(TableName("public", "People")) == 'public."People"'
    assert str(TableName("public", "person")) == "public.person"
    assert str(TableName("my schema", 'a"b')) == '"my schema"."a""b"'


@pytest.mark.parametrize("text", ["", "a.b.c", '"unclosed', 'a."b', "a.", ".a", "a b", '""',
                                  "a..b", "1abc", 'a"b"', "a.b ", "é"])
def test_bad_table_names(text: str) -> None:
    with pytest.raises(ValueError, match="table"):
        parse_table_name(text)


def test_bad_table_name_names_the_hook() -> None:
    with pytest.raises(ConfigError, match=r'hook "p": table .* must be NAME or SCHEMA\.NAME'):
        hook('name = "p"\ntable = "a.b.c"')


@given(st.tuples(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8)))
def test_table_name_round_trip(parts: tuple[str, str]) -> None:
    table = TableName(*parts)
    assert parse_table_name(str(table)) == table


# Errors name the hook and the problem -----------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ('name = "p"\ntable = "p"\nprovide = ["a"]',
     'hook "p": unknown key "provide" \\(did you mean "provides"\\?\\)'),
    ('name = "p"\ntable = "p"\nevent = ["insert"]',
     'hook "p": unknown key "event" \\(did you mean "events"\\?\\)'),
    ('name = "p"\ntable = "p"\nwhen_changd = ["a"]', 'did you mean "when_changed"'),
    ('name = "p"\ntable = "p"\ncolour = 1', 'hook "p": unknown key "colour"$'),
    ('name = "p"\ntable = "p"\nevents = ["insert", "upsert"]',
     'hook "p": unknown event "upsert" \\(expected any of insert, update, delete, truncate\\)'),
    ('name = "p"\ntable = "p"\nevents = ["INSERT"]', 'unknown event "INSERT"'),
    ('name = "p"\ntable = "p"\nevents = []', 'hook "p": events must name at least one'),
    ('name = "p"\ntable = "p"\nevents = "insert"', 'hook "p": events must be an array of names'),
    ('name = "p"\ntable = "p"\nevents = ["insert", "insert"]', "lists a name twice"),
    ('name = "p"\ntable = "p"\nprovides = "name"', 'hook "p": provides must be an array'),
    ('name = "p"\ntable = "p"\nprovides = ["a", ""]', "provides must be an array of names"),
    ('name = "p"\ntable = "p"\nprovides = [1]', "provides must be an array of names"),
    ('name = "p"\ntable = "p"\nkey = "id"', 'hook "p": key must be an array'),
    ('name = "p"\ntable = 5', 'hook "p": table must be a string'),
    ('name = "p"\ntable = "p"\nprovides = ["a"]\nwhen_changed = ["b"]',
     'when_changed column "b" is not provided'),
    ('name = "p"\ntable = "p"\nevents = ["insert"]\nwhen_changed = ["a"]',
     "when_changed applies to update"),
    ('name = "c"', 'hook "c": a custom hook \\(no table\\) must list what it provides'),
    ('name = "c"\nprovides = ["a"]\nevents = ["insert"]', 'hook "c": events needs a table'),
    ('name = "c"\nprovides = ["a"]\nkey = ["a"]', 'hook "c": key needs a table'),
    ('name = "c"\nprovides = ["a"]\nwhen_changed = ["a"]', 'hook "c": when_changed needs a table'),
    ('table = "p"', "hooks\\[0\\]: name must be"),
    ('name = ""', "hooks\\[0\\]: name must be"),
    ('name = "has space"', "name must be"),
    ('name = "9lives"', "name must be"),
    ('name = 5', "name must be"),
    ('name = "' + "x" * 41 + '"', "at most 40"),
    # "$" in the pattern matched before a trailing newline: the whole name must match.
    ('name = "person\\n"\ntable = "p"', "name must be"),
    ('name = "person\\nx"\ntable = "p"', "name must be"),
])
def test_hook_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        hook(text)


@pytest.mark.parametrize("name", ["person", "Person", "_p", "order.created", "a-b", "x" * 40])
def test_good_hook_names(name: str) -> None:
    assert hook(f'name = "{name}"\nprovides = []').name == name


def test_duplicate_names() -> None:
    with pytest.raises(ConfigError, match='hook "p": duplicate hook name'):
        parse('[[hooks]]\nname = "p"\ntable = "a"\n[[hooks]]\nname = "p"\nprovides = ["x"]')


@pytest.mark.parametrize(("text", "message"), [
    ("hook = []", 'config: unknown key "hook" \\(did you mean "hooks"\\?\\)'),
    ("[databse]", 'unknown key "databse" \\(did you mean "database"\\?\\)'),
    ("[database]\ndns = 'x'", '\\[database\\]: unknown key "dns" \\(did you mean "dsn"\\?\\)'),
    ("[database]\ndsn = 5", "dsn must be a string"),
    ("database = 5", "\\[database\\] must be a table"),
    ("hooks = 5", "hooks must be an array of tables"),
    ("hooks = [5]", "hooks\\[0\\] must be a table"),
    ("delivery = []", "\\[delivery\\] must be a table"),
])
def test_top_level_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(text)


# [delivery] -------------------------------------------------------------------

def test_delivery_section() -> None:
    config = parse("[delivery]\ntimeout = 2\nretry_schedule = [1, 2.5]\nconcurrency = 8\n"
                   "listener_concurrency = 2\nmax_response_bytes = 0\n"
                   "allow_private_networks = true\n"
                   'allowed_networks = ["10.0.0.0/8", "127.0.0.1", "::1/128"]')
    delivery = config.delivery
    assert delivery.timeout == 2.0
    assert delivery.retry_schedule == (1.0, 2.5)
    assert (delivery.concurrency, delivery.listener_concurrency) == (8, 2)
    assert delivery.max_response_bytes == 0
    assert delivery.allow_private_networks is True
    assert delivery.allowed_networks == (ipaddress.ip_network("10.0.0.0/8"),
                                         ipaddress.ip_network("127.0.0.1/32"),
                                         ipaddress.ip_network("::1/128"))
    assert parse("[delivery]\nretry_schedule = []").delivery.retry_schedule == ()
    assert parse("[delivery]\ncircuit_breaker = 0").delivery.circuit_breaker == 0
    assert parse("").delivery.circuit_breaker == 5
    assert (parse("").delivery.circuit_failure_rate, parse("").delivery.circuit_window) == (0.5, 30.0)
    circuit = parse("[delivery]\ncircuit_failure_rate = 1\ncircuit_window = 1").delivery
    assert (circuit.circuit_failure_rate, circuit.circuit_window) == (1.0, 1.0)
    assert parse("").delivery.max_event_bytes == 1 << 20
    assert parse("[delivery]\nmax_event_bytes = 1").delivery.max_event_bytes == 1


DELIVERY_ERRORS = [
    ("timout = 1", 'unknown key "timout" \\(did you mean "timeout"\\?\\)'),
    ("timeout = 0", "timeout must be between 0.1 and 300"),
    ("timeout = 301", "timeout must be between"),
    ('timeout = "4"', "timeout must be a number"),
    ("timeout = true", "timeout must be a number"),
    ("timeout = nan", "timeout must be between"),
    ("timeout = inf", "timeout must be between"),
    ("retry_schedule = 5", "retry_schedule must be an array"),
    ("retry_schedule = [-1]", "retry_schedule entries must be between"),
    ('retry_schedule = ["5s"]', "retry_schedule entries must be a number"),
    ("concurrency = 1.5", "concurrency must be an integer"),
    ("concurrency = 0", "concurrency must be between 1 and 4096"),
    ("listener_concurrency = 5000", "listener_concurrency must be between"),
    ("circuit_breaker = -1", "circuit_breaker must be between 0 and"),
    ("circuit_breaker = 2.5", "circuit_breaker must be an integer"),
    ("max_response_bytes = -1", "max_response_bytes must be between"),
    ("max_event_bytes = 0", "\\[delivery\\] max_event_bytes must be between 1 and"),
    ("max_event_bytes = 1.5", "\\[delivery\\] max_event_bytes must be an integer"),
    ('max_event_bytes = "1MB"', "\\[delivery\\] max_event_bytes must be an integer"),
    ('allow_private_networks = "yes"', "allow_private_networks must be true or false"),
    ('allowed_networks = ["10.0.0.0/33"]', "is not a network"),
    ('allowed_networks = ["localhost"]', "is not a network"),
    ('allowed_networks = "10.0.0.0/8"', "allowed_networks must be an array"),
    ("allowed_networks = 10", "allowed_networks must be an array"),
    # zero or negative timeouts, limits, rates, windows (issue 14)
    ("timeout = -1", "timeout must be between 0.1 and 300"),
    ("retry_schedule = [1, nan]", "retry_schedule entries must be between 0 and"),
    ("retry_schedule = [inf]", "retry_schedule entries must be between 0 and"),
    ("concurrency = -4", "concurrency must be between 1 and 4096"),
    ("listener_concurrency = 0", "listener_concurrency must be between 1 and 4096"),
    ("listener_concurrency = -1", "listener_concurrency must be between 1 and 4096"),
    ("disable_after_days = -1", "disable_after_days must be between 0 and 3650"),
    ("disable_after_days = nan", "disable_after_days must be between"),
    ('disable_after_days = "5d"', "disable_after_days must be a number"),
    ("circuit_failure_rate = 0", "circuit_failure_rate must be above 0 and at most 1 \\(got 0\\)"),
    ("circuit_failure_rate = -0.5", "circuit_failure_rate must be above 0 and at most 1"),
    ("circuit_failure_rate = 1.01", "circuit_failure_rate must be above 0 and at most 1"),
    ("circuit_failure_rate = nan", "circuit_failure_rate must be above 0 and at most 1"),
    ('circuit_failure_rate = "50%"', "circuit_failure_rate must be a number"),
    ("circuit_window = 0", "circuit_window must be between 1 and 86400 \\(got 0\\)"),
    ("circuit_window = -30", "circuit_window must be between 1 and 86400"),
    ("circuit_window = inf", "circuit_window must be between 1 and 86400"),
    ("circuit_window = true", "circuit_window must be a number"),
]


@pytest.mark.parametrize(("text", "message"), DELIVERY_ERRORS)
def test_delivery_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse("[delivery]\n" + text)


def test_every_delivery_setting_has_a_refused_value() -> None:
    """Each [delivery] key is checked at load: a new one gets its bad values above."""
    refused = {text.split(" =")[0] for text, _ in DELIVERY_ERRORS}
    assert {f.name for f in dataclasses.fields(DeliveryConfig)} <= refused


# Finding and reading the file -------------------------------------------------

def test_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config_path() == Path("cdc_hooks.toml")
    monkeypatch.setenv("CDC_HOOKS_CONFIG", str(tmp_path / "env.toml"))
    assert config_path() == tmp_path / "env.toml"
    assert config_path("explicit.toml") == Path("explicit.toml")


def test_env_dsn_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "postgresql://file/db"\n')
    assert load_config(path).dsn == "postgresql://file/db"
    monkeypatch.setenv("CDC_HOOKS_DSN", "postgresql://env/db")
    assert load_config(path).dsn == "postgresql://env/db"


def test_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"cdc_hooks\.toml: no such config file"):
        load_config()
    with pytest.raises(ConfigError, match=r"other\.toml: no such config file"):
        load_config("other.toml", required=False)  # named explicitly: must exist
    monkeypatch.setenv("CDC_HOOKS_DSN", "postgresql://env/db")
    assert load_config(required=False) == Config(dsn="postgresql://env/db")


@pytest.mark.parametrize("content", [b"[[hooks]\nname=", b"\xff\xfe", b"a = 1\na = 2"])
def test_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)


# Fuzzing: any input parses as written, or raises a ConfigError naming where --------

HOOK_KEYS = ["name", "table", "events", "provides", "key", "when_changed", "x"]
DELIVERY_KEYS = ["timeout", "retry_schedule", "concurrency", "listener_concurrency",
                 "max_response_bytes", "allow_private_networks", "allowed_networks",
                 "circuit_breaker", "circuit_failure_rate", "circuit_window", "disable_after_days"]
toml_scalars = (st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                | st.datetimes() | st.dates() | st.times()
                | st.sampled_from(["insert", "update", "delete", "person", 'public."People"',
                                   "a.b", "10.0.0.0/8", "::1", "p", ""]))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(HOOK_KEYS + DELIVERY_KEYS), inner,
                      max_size=4),
    max_leaves=10,
)
name_lists = st.lists(st.sampled_from(["insert", "update", "delete", "a", "b", "id"]), max_size=4)
# Mostly valid names and tables, so that the fuzzing reaches the checks behind them.
hook_tables = st.fixed_dictionaries(
    {"name": st.sampled_from(["p", "q"]) | toml_values},
    optional={"table": st.sampled_from(["p", 'public."P"', "a.b.c"]) | toml_values,
              **{k: name_lists | toml_values for k in HOOK_KEYS[2:]}},
)
documents = st.fixed_dictionaries({}, optional={
    "database": st.dictionaries(st.sampled_from(["dsn", "dns"]), toml_values, max_size=2)
    | toml_values,
    "hooks": st.lists(hook_tables | toml_values, max_size=3) | toml_values,
    "delivery": st.dictionaries(st.sampled_from(DELIVERY_KEYS), toml_values, max_size=4)
    | toml_values,
    "web": toml_values,
}) | st.dictionaries(st.text(max_size=8), toml_values, max_size=3)


def names_a_place_in(message: str, raw: Any) -> bool:
    """Whether a refusal starts by naming where in raw the problem is: a top-level key,
    a [section], hooks[i] or a hook by its name."""
    if message.startswith("config: unknown key "):
        return any(message.startswith(f'config: unknown key "{key}"') for key in raw)
    if section := re.match(r"\[(\w+)\]", message):
        return section[1] in raw
    if position := re.match(r"hooks\[(\d+)\]", message):
        return int(position[1]) < len(raw["hooks"])
    if message.startswith("hooks "):
        return "hooks" in raw
    return any(message.startswith(f'hook "{hook["name"]}"') for hook in raw.get("hooks", ())
               if isinstance(hook, dict) and isinstance(hook.get("name"), str))


@given(documents)
def test_parse_config_fuzz(raw: dict[str, Any]) -> None:
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        assert names_a_place_in(str(exc), raw), str(exc)
        return
    assert [hook.name for hook in config.hooks] == [hook["name"] for hook in raw.get("hooks", [])]


@given(st.text(alphabet=string.printable + '"é.', max_size=30))
def test_parse_table_name_fuzz(text: str) -> None:
    try:
        table = parse_table_name(text)
    except ValueError as exc:
        assert str(exc), text  # says why
        return
    assert parse_table_name(str(table)) == table  # written back, it reads the same


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.sampled_from([
    '[[hooks]]\nname = "p"\ntable = "p"\n', "[delivery]\nallowed_networks = ['::/0']\n"]))
def test_load_config_fuzz(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as exc:  # the file's own fault, or a place in it
        message = str(exc)
        assert message.startswith(f"{path}: not valid TOML") or \
            names_a_place_in(message, tomllib.loads(text)), message
