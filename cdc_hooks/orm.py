"""The table behind an ORM model: a SQLAlchemy mapped class or Table, or a Django model.

Django is duck-typed through ``_meta`` (``db_table``, ``pk``, ``concrete_fields``),
so cdc-hooks does not depend on it. The table comes back as config text
(``"schema"."name"``, quoted as the ORM quotes it), to be parsed like a
``[[hooks]] table``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy.orm import Mapper

from .errors import ConfigError


@dataclass(frozen=True)
class ModelTable:
    table: str  # as a [[hooks]] table: '"schema"."name"' or '"name"' (schema public)
    key: tuple[str, ...]  # the model's primary key columns
    columns: Mapping[str, str]  # attribute or field name -> column name


def model_table(model: Any) -> ModelTable:
    """Raises ConfigError if model is none of the kinds understood."""
    if isinstance(model, sqlalchemy.Table):
        return _sqlalchemy_table(model, {c.key: c.name for c in model.columns}, model.primary_key)
    mapper = sqlalchemy.inspect(model, raiseerr=False) if isinstance(model, type) else None
    if isinstance(mapper, Mapper):
        return _sqlalchemy_model(mapper)
    meta = getattr(model, "_meta", None)
    if meta is not None and hasattr(meta, "db_table") and hasattr(meta, "pk"):
        return _django_model(model, meta)
    raise ConfigError(f"model must be a SQLAlchemy mapped class or Table, or a Django model "
                      f"(got {model!r})")


def _sqlalchemy_model(mapper: Mapper[Any]) -> ModelTable:
    table = mapper.local_table
    if not isinstance(table, sqlalchemy.Table):
        raise ConfigError(f"model {mapper.class_.__name__} is mapped to {table!r}, not to a table")
    columns = {c.key: c.name for c in table.columns}
    for attribute in mapper.column_attrs:  # an attribute may be named apart from its column
        column = attribute.columns[0]
        if isinstance(column, sqlalchemy.Column) and column.table is table:
            columns[attribute.key] = column.name
    key: list[Any] = list(table.primary_key.columns) or [c for c in mapper.primary_key if c.table is table]
    return _sqlalchemy_table(table, columns, key)


def _sqlalchemy_table(table: sqlalchemy.Table, columns: Mapping[str, str],
                      key: Any) -> ModelTable:
    # SQLAlchemy names are literal (it quotes what needs quoting); no schema: the default one.
    name = _quoted(table.name) if table.schema is None else \
        f"{_quoted(table.schema)}.{_quoted(table.name)}"
    return ModelTable(name, tuple(c.name for c in key), columns)


def _django_model(model: Any, meta: Any) -> ModelTable:
    if getattr(meta, "abstract", False):
        raise ConfigError(f"model {model.__name__} is abstract: it has no table")
    # Django's own quoting: a name already in quotes is taken as it is
    # ('schema"."table' is the known way to name a schema).
    table = meta.db_table
    if not (table.startswith('"') and table.endswith('"')):
        table = f'"{table}"'
    columns: dict[str, str] = {}
    for field in getattr(meta, "concrete_fields", ()):
        columns[field.name] = columns[field.attname] = field.column  # author and author_id
    pk_fields = getattr(meta, "pk_fields", None) or [meta.pk]  # Django 5.2: composite keys
    return ModelTable(table, tuple(f.column for f in pk_fields), columns)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
