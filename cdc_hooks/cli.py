"""The ``cdc-hooks`` command: a thin adapter over the core modules."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import install as installer
from .config import Config, load_config
from .errors import CdcHooksError

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turns the errors a user can act on into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CdcHooksError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


class Context:
    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file

    def config(self, *, required: bool = True) -> Config:
        return load_config(self.config_file, required=required)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE", envvar="CDC_HOOKS_CONFIG",
              help="Config file (default: ./cdc_hooks.toml; env CDC_HOOKS_CONFIG).")
@click.version_option(package_name="cdc-hooks")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Change-data-capture from PostgreSQL to webhooks."""
    ctx.obj = Context(config_file)


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the SQL and change nothing.")
@pass_context
@friendly_errors
def install(ctx: Context, dry_run: bool) -> None:
    """Create or update the cdc_hooks schema and every hook's triggers, atomically."""
    config = ctx.config()
    if dry_run:
        plan, script = installer.dry_run(config)
        click.echo(script or "-- nothing to do")
        return
    plan = installer.install(config)
    for line in plan.changes or ["no changes: the database is in line with the config"]:
        click.echo(line)


@main.command()
@pass_context
@friendly_errors
def check(ctx: Context) -> None:
    """Report drift between the config and the database (exit 1 if any)."""
    problems = installer.check(ctx.config())
    for line in problems:
        click.echo(line)
    if problems:
        sys.exit(1)
    click.echo("ok: the database is in line with the config")


@main.command()
@click.option("--drop-schema", is_flag=True,
              help="Also drop the cdc_hooks schema, with its undelivered events and listeners.")
@pass_context
@friendly_errors
def uninstall(ctx: Context, drop_schema: bool) -> None:
    """Remove the triggers of every installed hook."""
    for line in installer.uninstall(ctx.config(), drop_schema=drop_schema):
        click.echo(line)
