"""The Python API, shaped like durian's: a registry of hooks, table hooks,
custom hooks with ``send``, and listeners built with ``listener().match().save()``.

    >>> from cdc_hooks import hooks, ModelHook, Startswith
    >>> class PersonHook(ModelHook):
    ...     name = "person"
    ...     model = Person  # a SQLAlchemy or Django model; or table = "public.person"
    ...     provides_args = ["name", "address"]
    >>> hooks.register(PersonHook)
    >>> PersonHook().listener(url="https://where.joe/is/listening").match(
    ...     name=Startswith("J")).save()

Hooks registered here are installed like ``[[hooks]]`` entries when the config
names their modules (``[python] modules``): every command imports those
modules, and ``declarations`` turns each registered hook into the same entry
that config.parse_hook validates.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import psycopg

from . import services
from .config import DEFAULT_EVENTS, Config, HookConfig, hook_label, load_config, parse_hook
from .db import Database
from .errors import CdcHooksError, ConfigError, ListenerError, first_line
from .match import rules_from_python, rules_to_json
from .orm import ModelTable, model_table
from .services.listeners import NewListener


class Hook:
    """A custom hook: not bound to a table, sent explicitly (durian's Hook)."""

    # Defaults a subclass may set (durian's style); the constructor's arguments override them.
    name: str = ""
    provides_args: Sequence[str] | None = None
    senders: Sequence[str] | None = None  # roles that may send it (config: senders)

    def __init__(self, name: str | None = None, provides_args: Sequence[str] | None = None,
                 registry: Registry | None = None, senders: Sequence[str] | None = None) -> None:
        self.name = name or type(self).name
        # Kept as given: config.parse_hook refuses what is not a list of names.
        self.provides_args = (provides_args if provides_args is not None
                              else type(self).provides_args)
        self.senders = senders if senders is not None else type(self).senders
        if not self.name:
            raise CdcHooksError(f"{type(self).__name__} needs a name")
        self.registry = registry or hooks
        self.registered_from: str | None = None  # the module that registered it

    @property
    def origin(self) -> str:
        """Where the hook is declared, for messages: its module and class."""
        cls = type(self)
        if cls.__module__ != __name__:
            return f"{cls.__module__}.{cls.__qualname__}"
        where = f" in {self.registered_from}" if self.registered_from else ""
        return f"{cls.__name__}({self.name!r}){where}"

    def listener(self, url: str, secret: str | None = None,
                 headers: Mapping[str, str] | None = None, *,
                 events: Sequence[str] | None = None, changed: Sequence[str] | None = None,
                 rate: float | None = None, **config: Any) -> ListenerBuilder:
        """A listener to save; ``headers`` are sent with every delivery (e.g. an API key);
        events: the kinds it takes (default: every event of the hook); changed: an
        update reaches it only if one of these columns changed (default: any update);
        rate: at most this many deliveries per second, across every relay (default:
        no limit)."""
        return ListenerBuilder(self, url, secret, config, headers, events, changed, rate)

    def send(self, sender: Any = None, *, connection: psycopg.Connection[Any] | None = None,
             **payload: Any) -> int:
        """Records a custom event; with ``connection``, inside the caller's transaction."""
        return send(self.name, payload, connection=connection, config=self.registry.config)

    def column(self, name: str) -> str:
        """The column (event field) a name given in Python stands for."""
        return name

    def declaration(self) -> dict[str, Any]:
        """The hook as a [[hooks]] entry, for config.parse_hook."""
        return _given(name=self.name, provides=self.provides_args, senders=self.senders)

    def to_config(self) -> HookConfig:
        """The hook as parsed from the config (raises ConfigError as a bad entry would)."""
        return parse_hook(_declaration(self), self.origin, self.origin)


class ModelHook(Hook):
    """A hook bound to a table (durian's ModelHook on post_save): ``model`` (a
    SQLAlchemy mapped class or Table, or a Django model) or ``table``."""

    model: ClassVar[Any] = None
    table: ClassVar[str | None] = None  # "schema.name", for code without models
    events: ClassVar[Sequence[str]] = DEFAULT_EVENTS
    key: ClassVar[Sequence[str] | None] = None  # default: the model's (table's) primary key
    when_changed: ClassVar[Sequence[str] | None] = None

    def _model_table(self) -> ModelTable | None:
        model = type(self).model
        return None if model is None else model_table(model)

    def column(self, name: str) -> str:
        found = self._model_table()
        return name if found is None else found.columns.get(name, name)

    def declaration(self) -> dict[str, Any]:
        cls = type(self)
        if (cls.model is None) == (cls.table is None):
            raise ConfigError("a ModelHook needs a model or a table" if cls.model is None
                              else "give a model or a table, not both")
        table, key, found = cls.table, self._columns(cls.key), self._model_table()
        if found is not None:
            table, key = found.table, key if key is not None else found.key
        return _given(name=self.name, table=table, events=cls.events,
                      provides=self._columns(self.provides_args), key=key,
                      when_changed=self._columns(cls.when_changed), senders=self.senders)

    def _columns(self, names: Any) -> Any:
        """Field names as columns (Django's db_column, SQLAlchemy's attribute keys);
        anything but a list of names is left for the config's checks to refuse."""
        if not isinstance(names, list | tuple):
            return names
        return [self.column(n) if isinstance(n, str) else n for n in names]


def _given(**entry: Any) -> dict[str, Any]:
    """The entry without its unset (None) keys: the config's defaults apply to them."""
    return {key: value for key, value in entry.items() if value is not None}


def _declaration(hook: Hook) -> dict[str, Any]:
    try:
        return hook.declaration()
    except ConfigError as exc:
        raise ConfigError(f"{hook_label(hook.name, hook.origin)}: {exc}") from None


class ListenerBuilder:
    """``hook.listener(url=...).match(name=Startswith("J")).save()``"""

    def __init__(self, hook: Hook, url: str, secret: str | None, config: Mapping[str, Any],
                 headers: Mapping[str, str] | None = None, events: Sequence[str] | None = None,
                 changed: Sequence[str] | None = None, rate: float | None = None) -> None:
        self.hook, self.url, self.secret, self.config = hook, url, secret, dict(config)
        self.rate = rate
        self.headers = dict(headers or {})
        self.events = events
        self.changed = None if changed is None else [hook.column(c) for c in changed]
        self.rules: dict[str, Any] = {}

    def match(self, **rules: Any) -> ListenerBuilder:
        columns = {self.hook.column(field): rule for field, rule in rules.items()}
        self.rules.update(rules_from_python(columns))
        return self

    def save(self) -> NewListener:
        config = self.hook.registry.config
        with Database.connect(config.dsn) as db:
            return services.listeners.add_listener(
                db, config, self.hook.name, self.url, rules_to_json(self.rules), self.secret,
                self.config, self.headers, self.events, self.changed, self.rate)


class Registry:
    """Hooks by name; ``config`` supplies the database (default: the config file)."""

    def __init__(self) -> None:
        self._hooks: dict[str, Hook] = {}  # declared in Python: register
        self._loaded: dict[str, Hook] = {}  # a config's other hooks: load
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(required=False)
        return self._config

    def configure(self, config: Config) -> None:
        self._config = config

    def register(self, hook: Hook | type[Hook]) -> Hook:
        """Declares a hook (a class or an instance); another hook of the same name is refused."""
        instance = hook(registry=self) if isinstance(hook, type) else hook
        instance.registered_from = sys._getframe(1).f_globals.get("__name__")
        before = self._hooks.get(instance.name)
        if before is not None and not _redeclared(before, instance):
            raise ConfigError(f"{hook_label(instance.name, instance.origin)}: duplicate hook "
                              f"name (also declared in {before.origin})")
        self._hooks[instance.name] = instance
        return instance

    def unregister(self, name: str) -> None:
        self._hooks.pop(name, None)
        self._loaded.pop(name, None)

    def get(self, name: str) -> Hook:
        found = self._hooks.get(name) or self._loaded.get(name)
        if found is None:
            raise ListenerError(f'unknown hook "{name}"')
        return found

    def __iter__(self) -> Iterator[Hook]:
        return iter([*self._hooks.values(), *self._loaded.values()])

    def declared(self) -> list[Hook]:
        """The hooks registered in Python (not those load() took from a config)."""
        return list(self._hooks.values())

    def load(self, config: Config) -> None:
        """Registers every hook of a config not declared here already."""
        self.configure(config)
        for declared in config.hooks:
            if declared.name not in self._hooks:
                self._loaded[declared.name] = Hook(declared.name, list(declared.provides or ()),
                                                   registry=self)


def _redeclared(before: Hook, hook: Hook) -> bool:
    """The same hook again: the same instance, or the same class (a module reloaded)."""
    by_class = type(hook).__module__ != __name__
    return before is hook or (by_class and before.origin == hook.origin)


def declarations(modules: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Imports the modules; then each hook registered in ``hooks`` as (origin, [[hooks]] entry)."""
    for module in modules:
        _import(module)
    return [(hook.origin, _declaration(hook)) for hook in hooks.declared()]


def _import(module: str) -> None:
    # As `python -m` and gunicorn do: modules of the project in the current directory import.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module)
    except Exception as exc:  # whatever the module raised: one line, not a traceback
        detail = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"[python] modules: cannot import {module}: {detail}") from exc


hooks = Registry()


def send(hook: str, payload: Mapping[str, Any], *,
         connection: psycopg.Connection[Any] | None = None, config: Config | None = None) -> int:
    """Records a custom hook's event (services.hooks.send) and returns its id; with
    ``connection``, inside the caller's transaction, else on the config's database."""
    if connection is not None:
        return services.hooks.send(Database(connection), hook, payload)
    with Database.connect((config or hooks.config).dsn) as db:
        return services.hooks.send(db, hook, payload)
