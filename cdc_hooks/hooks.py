"""The Python API, shaped like durian's: a registry of hooks, table hooks,
custom hooks with ``send``, and listeners built with ``listener().match().save()``.

    >>> from cdc_hooks import hooks, ModelHook, Startswith
    >>> class PersonHook(ModelHook):
    ...     name = "person"
    ...     table = "public.person"
    ...     provides_args = ["name", "address"]
    >>> hooks.register(PersonHook)
    >>> PersonHook().listener(url="https://where.joe/is/listening").match(
    ...     name=Startswith("J")).save()

Declaring a hook in Python does not install triggers: hooks that should
capture rows go in the config file and ``cdc-hooks install``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import psycopg

from . import jsoncodec
from .config import Config, HookConfig, load_config, parse_table_name
from .db import Database
from .errors import CdcHooksError, ListenerError
from .listeners import NewListener, add_listener
from .match import rules_from_python, rules_to_json


class Hook:
    """A custom hook: not bound to a table, sent explicitly (durian's Hook)."""

    name: ClassVar[str] = ""
    provides_args: ClassVar[list[str]] = []

    def __init__(self, name: str | None = None, provides_args: list[str] | None = None,
                 registry: Registry | None = None) -> None:
        self.name = name or type(self).name  # type: ignore[misc]
        self.provides_args = list(provides_args if provides_args is not None
                                  else type(self).provides_args)  # type: ignore[misc]
        if not self.name:
            raise CdcHooksError(f"{type(self).__name__} needs a name")
        self.registry = registry or hooks

    def listener(self, url: str, secret: str | None = None, **config: Any) -> ListenerBuilder:
        return ListenerBuilder(self, url, secret, config)

    def send(self, sender: Any = None, *, connection: psycopg.Connection[Any] | None = None,
             **payload: Any) -> int:
        """Records a custom event; with ``connection``, inside the caller's transaction."""
        return send(self.name, payload, connection=connection, config=self.registry.config)

    def to_config(self) -> HookConfig:
        return HookConfig(name=self.name, provides=tuple(self.provides_args))


class ModelHook(Hook):
    """A hook bound to a table (durian's ModelHook on post_save)."""

    table: ClassVar[str] = ""
    events: ClassVar[list[str]] = ["insert", "update"]

    def to_config(self) -> HookConfig:
        return HookConfig(name=self.name, table=parse_table_name(type(self).table),
                          events=tuple(type(self).events),
                          provides=tuple(self.provides_args) or None)


class ListenerBuilder:
    """``hook.listener(url=...).match(name=Startswith("J")).save()``"""

    def __init__(self, hook: Hook, url: str, secret: str | None,
                 config: Mapping[str, Any]) -> None:
        self.hook, self.url, self.secret, self.config = hook, url, secret, dict(config)
        self.rules: dict[str, Any] = {}

    def match(self, **rules: Any) -> ListenerBuilder:
        self.rules.update(rules_from_python(rules))
        return self

    def save(self) -> NewListener:
        config = self.hook.registry.config
        with Database.connect(config.dsn) as db:
            return add_listener(db, config, self.hook.name, self.url,
                                rules_to_json(self.rules), self.secret, self.config)


class Registry:
    """Hooks by name; ``config`` supplies the database (default: the config file)."""

    def __init__(self) -> None:
        self._hooks: dict[str, Hook] = {}
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(required=False)
        return self._config

    def configure(self, config: Config) -> None:
        self._config = config

    def register(self, hook: Hook | type[Hook]) -> Hook:
        instance = hook(registry=self) if isinstance(hook, type) else hook
        self._hooks[instance.name] = instance
        return instance

    def unregister(self, name: str) -> None:
        self._hooks.pop(name, None)

    def get(self, name: str) -> Hook:
        try:
            return self._hooks[name]
        except KeyError:
            raise ListenerError(f'unknown hook "{name}"') from None

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks.values())

    def load(self, config: Config) -> None:
        """Registers every hook of a config."""
        self.configure(config)
        for declared in config.hooks:
            self.register(Hook(declared.name, list(declared.provides or ()), registry=self))


hooks = Registry()


def send(hook: str, payload: Mapping[str, Any], *,
         connection: psycopg.Connection[Any] | None = None, config: Config | None = None) -> int:
    """Records a custom hook's event (cdc_hooks.send) and returns its id. Values are
    written as a table column of their PostgreSQL type would be (jsoncodec.dumps_postgres)."""
    try:
        if connection is not None:
            return _record(Database(connection), hook, payload)
        with Database.connect((config or hooks.config).dsn) as db:
            return _record(db, hook, payload)
    except (psycopg.errors.UndefinedObject, psycopg.errors.WrongObjectType,
            psycopg.errors.InvalidParameterValue) as exc:
        raise ListenerError(exc.diag.message_primary or str(exc)) from None
    except psycopg.errors.InvalidSchemaName:
        raise ListenerError("cdc_hooks is not installed: run cdc-hooks install") from None


def _record(db: Database, hook: str, payload: Mapping[str, Any]) -> int:
    # A timestamptz is written in the session's time zone, as the capture
    # triggers write one in the application's session.
    try:
        payload_json = jsoncodec.dumps_postgres(payload, db.conn.info.timezone)
    except (TypeError, ValueError) as exc:
        raise ListenerError(f'send "{hook}": {exc}') from None
    return db.send(hook, payload_json)
