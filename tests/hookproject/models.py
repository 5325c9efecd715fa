"""The application's models: one Django, one SQLAlchemy, each with a secret column
that no hook provides, and a field whose column is named otherwise."""

from __future__ import annotations

from django.db import models
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Person(models.Model):
    """durian's example model."""

    name = models.CharField("name", max_length=200)
    address = models.CharField("address", max_length=200, db_column="street_address")
    secret = models.CharField("secret", max_length=200)

    class Meta:
        app_label = "hookproject"  # table hookproject_person


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "Members"  # mixed case: a quoted name in PostgreSQL
    __table_args__ = ({"schema": "crm"},)

    member_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column("full_name", String(200))
    city: Mapped[str | None] = mapped_column(String(200))
    secret: Mapped[str | None] = mapped_column(String(200))
