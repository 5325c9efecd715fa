"""The config file: hooks to capture, where the database is, how to deliver.

Loading checks everything that can be checked without a database; install.py
checks tables and columns against the database itself.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_FILE = "cdc_hooks.toml"
EVENT_KINDS = ("insert", "update", "delete", "truncate")
DEFAULT_EVENTS = ("insert", "update")  # durian's post_save
# About a day in all: quick retries for blips, then hourly for outages.
DEFAULT_RETRY_SCHEDULE = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 28800.0)
HOOK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")  # fullmatch: "$" would let "x\n" in
MODULES_ENV = "CDC_HOOKS_MODULES"  # comma-separated; overrides [python] modules
BUILTIN_PREFIX = "cdc_hooks."  # built-in hooks, such as cdc_hooks.listener_disabled


@dataclass(frozen=True)
class TableName:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{_quote_if_needed(self.schema)}.{_quote_if_needed(self.name)}"


@dataclass(frozen=True)
class HookConfig:
    name: str
    table: TableName | None = None  # None: a custom hook, sent explicitly
    events: tuple[str, ...] = DEFAULT_EVENTS
    provides: tuple[str, ...] | None = None  # None: every column but the key
    key: tuple[str, ...] | None = None  # None: the table's primary key
    when_changed: tuple[str, ...] | None = None  # None: any provided column
    senders: tuple[str, ...] = ()  # custom hooks: roles that may send it, besides cdc-hooks itself
    # A hook declared in Python ([python] modules): its module and class, for messages.
    origin: str | None = field(default=None, compare=False)

    @property
    def is_custom(self) -> bool:
        return self.table is None

    @property
    def where(self) -> str:
        """How messages name the hook: 'hook "person"', with its module and class if declared in Python."""
        return hook_label(self.name, self.origin)


def hook_label(name: str, origin: str | None = None) -> str:
    return f'hook "{name}"' + (f" ({origin})" if origin else "")


@dataclass(frozen=True)
class DeliveryConfig:
    timeout: float = 4.0  # seconds per attempt, the whole exchange (durian's)
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    concurrency: int = 64  # requests in flight per relay
    listener_concurrency: int = 16  # requests in flight per listener per relay
    max_response_bytes: int = 4096  # response body kept in the attempt log
    allow_private_networks: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # A listener failing every attempt this long is disabled (cdc_hooks/health.py); 0: never.
    disable_after_days: float = 5.0
    # Failed requests in a row that open a listener's circuit (relay/circuit.py); 0: never.
    circuit_breaker: int = 5
    # ... provided failures are at least this share of its requests (0 < rate <= 1)
    # over the last circuit_window seconds: a receiver answering most keeps it closed.
    circuit_failure_rate: float = 0.5
    circuit_window: float = 30.0
    # An event body (UTF-8 JSON) larger than this is sent without its data (relay/events.py).
    max_event_bytes: int = 1 << 20


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished work is kept (cdc_hooks/retention.py). Pending
    deliveries, and the events they need, are never pruned."""

    delivered_days: float = 7.0  # delivered deliveries, after they finished
    failed_days: float = 30.0  # dead letters, unless redelivered first
    attempts_days: float = 7.0  # the attempt log
    events_days: float = 7.0  # events no delivery refers to any more
    interval: float = 600.0  # seconds between a relay's prune runs; 0: never (cron prune)
    batch: int = 5000  # rows deleted per statement, each its own transaction


WEB_TOKEN_ENV = "CDC_HOOKS_WEB_TOKEN"
MIN_TOKEN_LENGTH = 16  # characters of the web token, from any source


@dataclass(frozen=True)
class WebConfig:
    token: str | None = None  # CDC_HOOKS_WEB_TOKEN overrides it (see web_token)
    bind: str = "127.0.0.1:8080"
    metrics_public: bool = False  # True: /metrics answers without the token


@dataclass(frozen=True)
class Config:
    dsn: str | None = None
    relay_role: str | None = None  # install grants this role what the relay needs
    # install creates an event trigger (superuser) that re-creates a hook's triggers
    # when its table is created again (sql/migrations/0007_repair_triggers.sql)
    repair_triggers: bool = False
    hooks: tuple[HookConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    path: Path | None = None
    web: WebConfig = field(default_factory=WebConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    modules: tuple[str, ...] = ()  # [python] modules, imported for the hooks they register

    def hook(self, name: str) -> HookConfig:
        for hook in self.hooks:
            if hook.name == name:
                return hook
        known = ", ".join(h.name for h in self.hooks) or "none declared"
        raise ConfigError(f'unknown hook "{name}" (hooks: {known})')


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The file to read: --config, else CDC_HOOKS_CONFIG, else ./cdc_hooks.toml."""
    return Path(explicit or os.environ.get("CDC_HOOKS_CONFIG") or DEFAULT_CONFIG_FILE)


def load_config(path: str | os.PathLike[str] | None = None, *, required: bool = True) -> Config:
    """Reads and validates the config file; CDC_HOOKS_DSN overrides its dsn."""
    file = config_path(path)
    if not file.exists():
        if required or path is not None:
            raise ConfigError(f"{file}: no such config file")
        config = Config()
    else:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        config = replace(parse_config(raw), path=file)
    dsn = os.environ.get("CDC_HOOKS_DSN") or config.dsn
    modules = os.environ.get(MODULES_ENV)
    if modules:
        config = replace(config, modules=_module_names(
            [m.strip() for m in modules.split(",") if m.strip()], MODULES_ENV))
    return with_python_hooks(replace(config, dsn=dsn))


def with_python_hooks(config: Config) -> Config:
    """The config plus the hooks its [python] modules register, each parsed as a
    [[hooks]] entry; a name declared twice is refused."""
    if not config.modules:
        return config
    from .registry import declarations  # registry.py imports this module: imported when needed

    declared = tuple(parse_hook(raw, origin, origin) for origin, raw in declarations(config.modules))
    hooks = (*config.hooks, *declared)
    _refuse_duplicates(hooks)
    return replace(config, hooks=hooks)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validates the parsed TOML document."""
    _check_keys(raw, {"database", "hooks", "delivery", "web", "retention", "python"}, "config")
    database = _table(raw.get("database", {}), "[database]")
    _check_keys(database, {"dsn", "relay_role", "repair_triggers"}, "[database]")
    dsn = database.get("dsn")
    if dsn is not None and not isinstance(dsn, str):
        raise ConfigError("[database] dsn must be a string")
    relay_role = database.get("relay_role")
    if relay_role is not None and (not isinstance(relay_role, str) or not relay_role):
        raise ConfigError("[database] relay_role must be a role's name")
    repair_triggers = database.get("repair_triggers", False)
    if not isinstance(repair_triggers, bool):
        raise ConfigError("[database] repair_triggers must be true or false")
    hooks_raw = raw.get("hooks", [])
    if not isinstance(hooks_raw, list):
        raise ConfigError("hooks must be an array of tables: [[hooks]]")
    hooks = tuple(parse_hook(h, f"hooks[{i}]") for i, h in enumerate(hooks_raw))
    _refuse_duplicates(hooks)
    python = _table(raw.get("python", {}), "[python]")
    _check_keys(python, {"modules"}, "[python]")
    modules = _module_names(python.get("modules", []), "[python] modules")
    delivery = _parse_delivery(_table(raw.get("delivery", {}), "[delivery]"))
    web = _parse_web(_table(raw.get("web", {}), "[web]"))
    retention = _parse_retention(_table(raw.get("retention", {}), "[retention]"))
    return Config(dsn=dsn, relay_role=relay_role, hooks=hooks, delivery=delivery, web=web,
                  retention=retention, modules=modules, repair_triggers=repair_triggers)


def _refuse_duplicates(hooks: Sequence[HookConfig]) -> None:
    first: dict[str, HookConfig] = {}
    for hook in hooks:
        before = first.setdefault(hook.name, hook)
        if before is not hook:
            also = f" (also declared in {before.origin or '[[hooks]]'})" if hook.origin else ""
            raise ConfigError(f"{hook.where}: duplicate hook name{also}")


def _module_names(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise ConfigError(f'{where} must be an array of module names, such as ["myapp.webhooks"]')
    for module in raw:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f'{where}: "{module}" is not a module name (such as myapp.webhooks)')
    return tuple(dict.fromkeys(raw))


def _parse_retention(raw: Mapping[str, Any]) -> RetentionConfig:
    defaults = RetentionConfig()
    days = ("delivered_days", "failed_days", "attempts_days", "events_days")
    _check_keys(raw, {*days, "interval", "batch"}, "[retention]")
    # Fractions of a day are allowed (0.5 = 12 hours); at least about a minute.
    kept = {k: _number(raw.get(k, getattr(defaults, k)), f"[retention] {k}", 0.001, 36500)
            for k in days}
    interval = _number(raw.get("interval", defaults.interval), "[retention] interval", 0, 86400)
    batch = int(_number(raw.get("batch", defaults.batch), "[retention] batch", 1, 1_000_000,
                        integer=True))
    return RetentionConfig(**kept, interval=interval, batch=batch)


def web_token(config: Config) -> str | None:
    """The token of the web interface, the REST API and /metrics: CDC_HOOKS_WEB_TOKEN,
    else [web] token; None if neither is set (an empty variable counts as unset)."""
    from_environment = os.environ.get(WEB_TOKEN_ENV)
    if from_environment:
        return _checked_token(from_environment, WEB_TOKEN_ENV)
    return config.web.token


def _checked_token(token: Any, source: str) -> str:
    # A short token could be guessed by trying: the web interface can change listeners.
    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{source} must be a string of at least {MIN_TOKEN_LENGTH} characters")
    return token


def _parse_web(raw: Mapping[str, Any]) -> WebConfig:
    _check_keys(raw, {"token", "bind", "metrics_public"}, "[web]")
    token = raw.get("token")
    if token is not None:
        _checked_token(token, "[web] token")
    bind = raw.get("bind", WebConfig.bind)
    if not isinstance(bind, str) or ":" not in bind:
        raise ConfigError('[web] bind must be "HOST:PORT" (for example "127.0.0.1:8080")')
    metrics_public = raw.get("metrics_public", False)
    if not isinstance(metrics_public, bool):
        raise ConfigError("[web] metrics_public must be true or false")
    return WebConfig(token, bind, metrics_public)


def parse_hook(raw: Any, position: str, origin: str | None = None) -> HookConfig:
    """One [[hooks]] entry; a hook declared in Python comes as the same dict, with
    its module and class as position and origin. Raises ConfigError naming the hook."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{position} must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not HOOK_NAME.fullmatch(name):
        raise ConfigError(
            f"{position}: name must be a string of letters, digits, _ . - "
            f"starting with a letter or _, at most 40 characters (got {name!r})"
        )
    where = hook_label(name, origin)
    if name.startswith(BUILTIN_PREFIX):
        raise ConfigError(f"{where}: names starting with {BUILTIN_PREFIX} are reserved for "
                          "cdc-hooks' own hooks (installed by cdc-hooks install)")
    _check_keys(raw, {"name", "table", "events", "provides", "key", "when_changed", "senders"}, where)
    table = raw.get("table")
    if table is None:
        for table_only in ("events", "key", "when_changed"):
            if table_only in raw:
                raise ConfigError(f"{where}: {table_only} needs a table (a custom hook has none)")
        if "provides" not in raw:
            raise ConfigError(f"{where}: a custom hook (no table) must list what it provides")
        return HookConfig(name=name, provides=_names(raw["provides"], where, "provides"),
                          senders=_names(raw.get("senders", []), where, "senders"), origin=origin)
    if "senders" in raw:
        raise ConfigError(f"{where}: senders applies to custom hooks; a table hook's events "
                          "come from writes to its table, by whoever may write it")
    if not isinstance(table, str):
        raise ConfigError(f"{where}: table must be a string")
    try:
        table_name = parse_table_name(table)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    events = _names(raw.get("events", list(DEFAULT_EVENTS)), where, "events")
    if not events:
        raise ConfigError(f"{where}: events must name at least one of {', '.join(EVENT_KINDS)}")
    for event in events:
        if event not in EVENT_KINDS:
            raise ConfigError(
                f'{where}: unknown event "{event}" (expected any of {", ".join(EVENT_KINDS)})'
            )
    provides = _names(raw["provides"], where, "provides") if "provides" in raw else None
    key = _names(raw["key"], where, "key") if "key" in raw else None
    when_changed: tuple[str, ...] | None = None
    if "when_changed" in raw:
        when_changed = _names(raw["when_changed"], where, "when_changed")
        if "update" not in events:
            raise ConfigError(f"{where}: when_changed applies to update events, which it lacks")
        if provides is not None:
            for column in when_changed:
                if column not in provides:
                    raise ConfigError(f'{where}: when_changed column "{column}" is not provided')
    return HookConfig(name, table_name, events, provides, key, when_changed, origin=origin)


def _parse_delivery(raw: Mapping[str, Any]) -> DeliveryConfig:
    _check_keys(
        raw,
        {"timeout", "retry_schedule", "concurrency", "listener_concurrency",
         "max_response_bytes", "allow_private_networks", "allowed_networks",
         "disable_after_days", "circuit_breaker", "circuit_failure_rate", "circuit_window",
         "max_event_bytes"},
        "[delivery]",
    )
    defaults = DeliveryConfig()
    timeout = _number(raw.get("timeout", defaults.timeout), "[delivery] timeout", 0.1, 300)
    schedule_raw = raw.get("retry_schedule", list(defaults.retry_schedule))
    if not isinstance(schedule_raw, list):
        raise ConfigError("[delivery] retry_schedule must be an array of seconds")
    schedule = tuple(
        _number(s, "[delivery] retry_schedule entries", 0, 7 * 86400) for s in schedule_raw
    )
    concurrency = int(_number(raw.get("concurrency", defaults.concurrency),
                              "[delivery] concurrency", 1, 4096, integer=True))
    per_listener = int(_number(raw.get("listener_concurrency", defaults.listener_concurrency),
                               "[delivery] listener_concurrency", 1, 4096, integer=True))
    max_bytes = int(_number(raw.get("max_response_bytes", defaults.max_response_bytes),
                            "[delivery] max_response_bytes", 0, 1 << 20, integer=True))
    allow_private = raw.get("allow_private_networks", False)
    if not isinstance(allow_private, bool):
        raise ConfigError("[delivery] allow_private_networks must be true or false")
    networks_raw = raw.get("allowed_networks", [])
    if not isinstance(networks_raw, list):
        raise ConfigError('[delivery] allowed_networks must be an array such as ["10.0.0.0/8"]')
    networks = []
    for entry in networks_raw:
        try:
            networks.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            raise ConfigError(f"[delivery] allowed_networks: {entry!r} is not a network") from None
    disable_after = _number(raw.get("disable_after_days", defaults.disable_after_days),
                            "[delivery] disable_after_days", 0, 3650)
    breaker = int(_number(raw.get("circuit_breaker", defaults.circuit_breaker),
                          "[delivery] circuit_breaker", 0, 1_000_000, integer=True))
    rate = _number(raw.get("circuit_failure_rate", defaults.circuit_failure_rate),
                   "[delivery] circuit_failure_rate", 0, 1, low_open=True)
    window = _number(raw.get("circuit_window", defaults.circuit_window),
                     "[delivery] circuit_window", 1, 86400)
    max_event = int(_number(raw.get("max_event_bytes", defaults.max_event_bytes),
                            "[delivery] max_event_bytes", 1, 1 << 30, integer=True))
    return DeliveryConfig(timeout, schedule, concurrency, per_listener, max_bytes,
                          allow_private, tuple(networks), disable_after, breaker,
                          circuit_failure_rate=rate, circuit_window=window,
                          max_event_bytes=max_event)


def parse_table_name(text: str) -> TableName:
    """'person', 'public.person' or 'public."People"' -> TableName (default schema public)."""
    parts = _split_identifiers(text)
    if len(parts) == 1:
        return TableName("public", parts[0])
    if len(parts) == 2:
        return TableName(parts[0], parts[1])
    raise ValueError(f"table {text!r} must be NAME or SCHEMA.NAME")


def _split_identifiers(text: str) -> list[str]:
    parts: list[str] = []
    i = 0
    while True:
        if i < len(text) and text[i] == '"':
            end = i + 1
            name = ""
            while True:
                close = text.find('"', end)
                if close < 0:
                    raise ValueError(f"table {text!r} has an unclosed quote")
                name += text[end:close]
                if text[close + 1 : close + 2] == '"':
                    name += '"'
                    end = close + 2
                    continue
                i = close + 1
                break
        else:
            match = re.match(r"[A-Za-z_][A-Za-z0-9_$]*", text[i:])
            if not match:
                raise ValueError(f"table {text!r} is not a valid name")
            name = match.group().lower()
            i += match.end()
        if not name:
            raise ValueError(f"table {text!r} has an empty name")
        parts.append(name)
        if i == len(text):
            return parts
        if text[i] != ".":
            raise ValueError(f"table {text!r} is not a valid name")
        i += 1


def _quote_if_needed(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f' (did you mean "{near[0]}"?)' if near else ""
            raise ConfigError(f'{where}: unknown key "{key}"{hint}')


def _table(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    return raw


def _names(raw: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not all(
        isinstance(v, str) and v for v in raw
    ):
        raise ConfigError(f"{where}: {key} must be an array of names")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{where}: {key} lists a name twice")
    return tuple(raw)


def _number(raw: Any, where: str, low: float, high: float, *, integer: bool = False,
            low_open: bool = False) -> float:
    """raw, checked to be a number (integer: an integer) from low (low_open: above
    low) to high; NaN and infinities are outside every range."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or (
        integer and not isinstance(raw, int)
    ):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind}")
    if low_open and not low < raw <= high:
        raise ConfigError(f"{where} must be above {low:g} and at most {high:g} (got {raw})")
    if not low <= raw <= high:
        raise ConfigError(f"{where} must be between {low:g} and {high:g} (got {raw})")
    return float(raw)
