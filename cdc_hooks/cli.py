"""The ``cdc-hooks`` command: a thin adapter over the services (cdc_hooks/services)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar, cast

import click
import psycopg
import sqlalchemy

from . import capturing, jsoncodec, logs, services
from . import install as installer
from .config import Config, load_config
from .db import SCHEMA_GONE, Database
from .dsn import check_dsn
from .errors import CdcHooksError, ListenerError, first_line
from .extras import needs
from .match import match_options_to_json
from .metrics import MetricsServer
from .relay.relay import Server, run_forever

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
        except psycopg.Error as exc:  # e.g. permission denied: PostgreSQL's own words
            message = exc.diag.message_primary if exc.diag else None
            if isinstance(exc, SCHEMA_GONE) and "cdc_hooks" in (message or ""):
                click.echo(f"error: cdc_hooks is not installed ({message}): run cdc-hooks install",
                           err=True)
                sys.exit(1)
            click.echo(f"error: PostgreSQL: {message or str(exc).strip()}", err=True)
            sys.exit(1)
        except sqlalchemy.exc.SQLAlchemyError as exc:  # install.py unwraps PostgreSQL's errors
            click.echo(f"error: {first_line(exc)}", err=True)
            sys.exit(1)

    return cast(F, wrapper)  # functools.wraps keeps the signature mypy cannot follow


class Context:
    def __init__(self, config_file: str | None, log_format: str = "text") -> None:
        self.config_file = config_file
        self.log_format = log_format

    def config(self, *, required: bool = True) -> Config:
        return load_config(self.config_file, required=required)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE", envvar="CDC_HOOKS_CONFIG",
              help="Config file (default: ./cdc_hooks.toml; env CDC_HOOKS_CONFIG).")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              envvar="CDC_HOOKS_LOG_FORMAT",
              help="Logs of run and web: text, or one JSON object per line (env CDC_HOOKS_LOG_FORMAT).")
@click.version_option(package_name="cdc-hooks")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_format: str) -> None:
    """Change-data-capture from PostgreSQL to webhooks."""
    ctx.obj = Context(config_file, log_format)


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the SQL and change nothing.")
@click.option("--force", is_flag=True,
              help="Pause the listeners the change leaves unable to match (removed hook, field no "
                   "longer provided, event no longer captured) instead of refusing.")
@pass_context
@friendly_errors
def install(ctx: Context, dry_run: bool, force: bool) -> None:
    """Create or update the cdc_hooks schema and every hook's triggers, atomically."""
    config = ctx.config()
    if dry_run:
        plan, script = installer.dry_run(config, force=force)
        click.echo(script or "-- nothing to do")
        return
    plan = installer.install(config, force=force)
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


@main.command()
@click.argument("hook")
@click.argument("fields", nargs=-1, metavar="KEY=VALUE|KEY:=JSON...")
@pass_context
@friendly_errors
def send(ctx: Context, hook: str, fields: tuple[str, ...]) -> None:
    """Send a custom hook's event (durian's Hook.send): values are strings, KEY:=JSON for others."""
    payload = parse_fields(fields)
    with Database.connect(ctx.config().dsn) as db:
        event_id = services.hooks.send(db, hook, payload)
    click.echo(f"sent event evt_{event_id}")


def parse_fields(fields: tuple[str, ...]) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for field in fields:
        if "=" not in field:
            raise ListenerError(f"{field!r}: expected KEY=VALUE or KEY:=JSON")
        key, _, value = field.partition("=")
        if key.endswith(":"):
            key, text = key[:-1], value
            try:
                value = jsoncodec.loads_given(text)
            except jsoncodec.TooDeep as exc:
                raise ListenerError(f"{key}: the JSON is {exc}") from None
            except ValueError:
                raise ListenerError(f"{field!r}: {text!r} is not JSON") from None
        if not key:
            raise ListenerError(f"{field!r}: empty key")
        payload[key] = value
    return payload


@main.group()
def listeners() -> None:
    """Manage listeners: who receives which hook's events."""


@listeners.command("add")
@click.argument("hook")
@click.argument("url")
@click.option("--match", "matches", multiple=True, metavar="FIELD=VALUE|FIELD=OP:VALUE|FIELD:=JSON",
              help="Filter (repeatable). OP: any, is, startswith, endswith, contains, like; "
                   "another WORD: is refused (is:WORD:... matches that text).")
@click.option("--secret", metavar="whsec_...", help="Signing secret (default: generated).")
@click.option("--backfill/--no-backfill", default=None,
              help="Take backfill ('read') events of cdc-hooks backfill (default: yes).")
@click.option("--header", "header_lines", multiple=True, metavar='"NAME: VALUE"',
              help="An HTTP header sent with every delivery, e.g. an API key (repeatable; "
                   "values are never listed).")
@click.option("--events", "events", multiple=True, metavar="KIND[,KIND...]",
              help="Event kinds to take (repeatable or comma-separated): any of the hook's "
                   "events, and read for backfills (default: every event of the hook).")
@click.option("--changed", "changed", multiple=True, metavar="COLUMN[,COLUMN...]",
              help="An update reaches the listener only if one of these provided columns "
                   "changed (repeatable; default: any update; inserts and deletes always).")
@click.option("--rate", type=float, metavar="PER_SECOND",
              help="At most this many deliveries per second to the listener, across every "
                   "relay; bursts wait their turn (default: no limit).")
@pass_context
@friendly_errors
def listeners_add(ctx: Context, hook: str, url: str, matches: tuple[str, ...],
                  secret: str | None, backfill: bool | None, header_lines: tuple[str, ...],
                  events: tuple[str, ...], changed: tuple[str, ...], rate: float | None) -> None:
    """Add a listener for HOOK that POSTs matching events to URL."""
    config = ctx.config()
    match = match_options_to_json(list(matches))
    headers = services.listeners.headers_from_lines(header_lines)
    listener_config = {} if backfill is None else {"backfill": backfill}
    with Database.connect(config.dsn) as db:
        created = services.listeners.add_listener(
            db, config, hook, url, match, secret, listener_config, headers,
            services.listeners.split_names(events), services.listeners.split_names(changed), rate)
    click.echo(f"listener {created.id} added")
    if secret is None:  # a secret the user chose is not echoed into terminals and logs
        click.echo(f"secret: {created.secret}  (shown once; receivers verify signatures with it)")
    if headers:  # likewise their values
        click.echo(f"headers: {', '.join(headers)}")


@listeners.command("list")
@pass_context
@friendly_errors
def listeners_list(ctx: Context) -> None:
    """List listeners (secrets are never shown)."""
    with Database.connect(ctx.config().dsn) as db:
        found = services.listeners.list_listeners(db)
    print_table(["ID", "HOOK", "URL", "MATCH", "HEADERS", "STATE", "LAST DELIVERY"], [
        [r.id, r.hook, r.url, r.match_text if r.match_error is None else f"unusable: {r.match_error}",
         ", ".join(r.header_names) or "-",
         r.state + (f" ({r.disabled_reason})" if r.disabled_reason else "")
         + ("" if r.backfill else ", no backfill")
         + (f", old secret signs until {r.secret_overlap_until:%Y-%m-%d %H:%M:%S %Z}"
            if r.secret_overlap_until else "")
         + (f", events: {','.join(r.events)}" if r.events else "")
         + (f", changed: {','.join(r.changed)}" if r.changed else "")
         + (f", rate: {r.rate:g}/s" if r.rate is not None else ""),
         describe_outcome(r.last_delivery)]
        for r in found
    ])


def describe_outcome(last: services.listeners.LastDelivery | None) -> str:
    if last is None:
        return "-"
    if last.status == "delivered":
        return f"delivered ({last.code})"
    return f"{'retrying' if last.status == 'pending' else 'failed'}: {last.error or last.code}"


def _state_command(name: str, state: str, help_text: str) -> None:
    @listeners.command(name, help=help_text)
    @click.argument("listener_id", type=int)
    @pass_context
    @friendly_errors
    def command(ctx: Context, listener_id: int) -> None:
        with Database.connect(ctx.config().dsn) as db:
            services.listeners.set_state(db, listener_id, state)
        click.echo(f"listener {listener_id} {state}")


_state_command("pause", "paused", "Hold deliveries for a listener (sent on resume).")
_state_command("resume", "active", "Resume (or re-enable) a listener; held deliveries go out.")


@listeners.command("update")
@click.argument("listener_id", type=int)
@click.option("--url", help="The new URL the events are POSTed to.")
@click.option("--match", "matches", multiple=True, metavar="FIELD=VALUE|FIELD=OP:VALUE|FIELD:=JSON",
              help="The new filter (repeatable), replacing the whole match; as in listeners add.")
@click.option("--no-match", is_flag=True, help="Remove the filter: every event matches.")
@click.option("--header", "header_lines", multiple=True, metavar='"NAME: VALUE"',
              help="The new headers (repeatable), replacing the whole set.")
@click.option("--no-headers", is_flag=True, help="Remove every header.")
@click.option("--backfill/--no-backfill", default=None,
              help="Take backfill ('read') events of cdc-hooks backfill, or not.")
@click.option("--events", "events", multiple=True, metavar="KIND[,KIND...]",
              help="The event kinds it takes, replacing them (repeatable or comma-separated).")
@click.option("--all-events", is_flag=True, help="Take every event of the hook again.")
@click.option("--changed", "changed", multiple=True, metavar="COLUMN[,COLUMN...]",
              help="The changed-column filter, replacing it (repeatable or comma-separated).")
@click.option("--any-change", is_flag=True, help="Take every update again.")
@click.option("--rate", type=float, metavar="PER_SECOND",
              help="At most this many deliveries per second, across every relay.")
@click.option("--no-rate", is_flag=True, help="Remove the rate limit.")
@pass_context
@friendly_errors
def listeners_update(ctx: Context, listener_id: int, url: str | None, matches: tuple[str, ...],
                     no_match: bool, header_lines: tuple[str, ...], no_headers: bool,
                     backfill: bool | None, events: tuple[str, ...], all_events: bool,
                     changed: tuple[str, ...], any_change: bool, rate: float | None,
                     no_rate: bool) -> None:
    """Change a listener: what is not given stays as it is."""
    match = _replacement("--match", "--no-match", matches, no_match, match_options_to_json)
    headers = _replacement("--header", "--no-headers", header_lines, no_headers,
                           services.listeners.headers_from_lines)
    kinds = _names_replacement("--events", "--all-events", events, all_events)
    columns = _names_replacement("--changed", "--any-change", changed, any_change)
    new_rate = _rate_replacement(rate, no_rate)
    if (url, match, headers, backfill, kinds, columns) == (None,) * 6 and new_rate is services.listeners.KEEP:
        raise ListenerError("nothing to change: give --url, --match, --no-match, --header, "
                            "--no-headers, --backfill, --no-backfill, --events, --all-events, "
                            "--changed, --any-change, --rate or --no-rate")
    config = ctx.config()
    with Database.connect(config.dsn) as db:
        services.listeners.update_listener(db, config, listener_id, url=url, match=match,
                                           headers=headers, backfill=backfill, events=kinds,
                                           changed=columns, rate=new_rate)
    click.echo(f"listener {listener_id} updated")


def _replacement(option: str, clearing: str, given: tuple[str, ...], clear: bool,
                 parse: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any] | None:
    """What replaces a set (a match, headers): the parsed options, {} to clear it, or
    None if neither was given."""
    if given and clear:
        raise ListenerError(f"give {option} or {clearing}, not both")
    if clear:
        return {}
    return parse(list(given)) if given else None


def _names_replacement(option: str, clearing: str, given: tuple[str, ...],
                       clear: bool) -> list[str] | None:
    """A filter's new names, [] to reset it to its default, or None if not given."""
    if given and clear:
        raise ListenerError(f"give {option} or {clearing}, not both")
    return [] if clear else services.listeners.split_names(given) if given else None


def _rate_replacement(rate: float | None, no_rate: bool) -> float | services.listeners.Keep | None:
    """The new rate limit, None to remove it, or KEEP if neither option was given."""
    if rate is not None and no_rate:
        raise ListenerError("give --rate or --no-rate, not both")
    return None if no_rate else services.listeners.KEEP if rate is None else rate


@listeners.command("rotate")
@click.argument("listener_id", type=int)
@click.option("--overlap", type=float, default=services.listeners.DEFAULT_OVERLAP, show_default=True,
              metavar="SECONDS",
              help="The old secret keeps signing beside the new one this long (0: not at all).")
@pass_context
@friendly_errors
def listeners_rotate(ctx: Context, listener_id: int, overlap: float) -> None:
    """Replace a listener's signing secret; prints the new one, once."""
    config = ctx.config()
    with Database.connect(config.dsn) as db:
        secret = services.listeners.rotate(db, config, listener_id, overlap)
        until = services.listeners.get_listener(db, listener_id).secret_overlap_until
    click.echo(f"secret: {secret}  (shown once; receivers verify signatures with it)")
    if until is not None:
        click.echo(f"until {until:%Y-%m-%d %H:%M:%S %Z} deliveries are signed with the old "
                   "secret too: switch the receiver before then")


@listeners.command("remove")
@click.argument("listener_id", type=int)
@pass_context
@friendly_errors
def listeners_remove(ctx: Context, listener_id: int) -> None:
    """Remove a listener and its pending deliveries."""
    with Database.connect(ctx.config().dsn) as db:
        services.listeners.remove_listener(db, listener_id)
    click.echo(f"listener {listener_id} removed")


@main.command()
@click.option("--failed", is_flag=True, help="Only dead letters (retries exhausted).")
@click.option("--listener", "listener_id", type=int, help="Only this listener's deliveries.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@pass_context
@friendly_errors
def deliveries(ctx: Context, failed: bool, listener_id: int | None, limit: int) -> None:
    """List recent deliveries, newest first."""
    with Database.connect(ctx.config().dsn) as db:
        found = services.deliveries.page(db, limit=limit, status="dead" if failed else None,
                                         listener_id=listener_id)
    print_table(["ID", "EVENT", "LISTENER", "HOOK", "KIND", "STATUS", "ATTEMPTS", "LAST"], [
        [d.id, f"evt_{d.event_id}", d.listener_id, d.hook, d.kind, d.status, d.attempts,
         d.last_error or d.last_code or "-"] for d in found.items
    ])


class Moment(click.ParamType):  # type: ignore[type-arg]  # generic in click's stubs alone
    """An ISO 8601 date or time; one without an offset is in the local time zone."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            moment = value
        else:
            try:
                moment = datetime.fromisoformat(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an ISO 8601 time, such as 2026-12-03 14:00 "
                          "(local time) or 2026-12-03T13:00Z", param, ctx)
        return moment if moment.tzinfo else moment.astimezone()  # naive: local time


@main.command()
@click.argument("delivery_id", type=int, required=False)
@click.option("--listener", "listener_id", type=int, help="Every dead letter of this listener.")
@click.option("--since", type=Moment(), metavar="TIME",
              help="Dead letters created since this time, ISO 8601: 2026-12-03T14:00+01:00, "
                   "2026-12-03T13:00Z, or without an offset (2026-12-03 14:00) in this "
                   "machine's local time zone (TZ).")
@pass_context
@friendly_errors
def redeliver(ctx: Context, delivery_id: int | None, listener_id: int | None,
              since: datetime | None) -> None:
    """Send a delivery again (same webhook-id), or dead letters in bulk."""
    if (delivery_id is None) == (listener_id is None and since is None):
        raise ListenerError("give a DELIVERY_ID, or --listener and/or --since (not both)")
    with Database.connect(ctx.config().dsn) as db:
        if delivery_id is not None:
            ids = services.deliveries.redeliver(db, delivery_id)
        else:
            ids = services.deliveries.redeliver_dead(db, listener_id=listener_id, since=since)
    click.echo(f"{len(ids)} deliver{'y' if len(ids) == 1 else 'ies'} queued again")


@main.command()
@click.option("--minutes", type=click.IntRange(1, 1440), default=5, show_default=True)
@pass_context
@friendly_errors
def status(ctx: Context, minutes: int) -> None:
    """Backlog, lag, recent deliveries and failures, failing and held listeners;
    exit 1 if a hook is not capturing."""
    with Database.connect(ctx.config().dsn) as db:
        report = services.status.report(db, minutes)
    print_table(["WHAT", "VALUE"], [
        ["outbox chunks not yet dispatched", report.outbox_chunks],
        ["deliveries pending", report.pending],
        ["oldest undispatched change (s)", _seconds(report.oldest_outbox_age)],
        ["oldest pending delivery (s)", _seconds(report.oldest_pending_age)],
        [f"delivered, last {minutes} min", report.delivered],
        [f"failed attempts, last {minutes} min", report.failed_attempts],
        ["dead letters", report.dead],
    ])
    if report.failing_listeners:
        click.echo("\nfailing listeners:")
        print_table(["ID", "HOOK", "URL", "STATE", "DEAD", "RETRYING"], [
            [f.id, f.hook, f.url, f.state + (f" ({f.disabled_reason})" if f.disabled_reason else ""),
             f.dead, f.retrying] for f in report.failing_listeners
        ])
    if report.held_listeners:
        click.echo("\npaused or disabled listeners:")
        print_table(["ID", "HOOK", "URL", "STATE", "REASON"],
                    [[h.id, h.hook, h.url, h.state, h.disabled_reason or "-"]
                     for h in report.held_listeners])
    if report.hooks_not_capturing:
        click.echo("\nhooks NOT capturing (their writes commit without events):")
        print_table(["HOOK", "TABLE", "PROBLEM"],
                    [[h.hook, h.table, h.problem] for h in report.hooks_not_capturing])
        click.echo(f"fix: {capturing.REPAIR_HINT}")
        sys.exit(1)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@main.command()
@click.option("--web", "web_bind", metavar="HOST:PORT",
              help="Also serve the web interface and REST API from this process.")
@click.option("--metrics", "metrics_bind", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Relay processes, to use more than one core; [delivery] concurrency and "
                   "listener_concurrency are split among them.")
@pass_context
@friendly_errors
def run(ctx: Context, web_bind: str | None, metrics_bind: str | None, workers: int) -> None:
    """Run the relay until SIGTERM/SIGINT."""
    config = ctx.config()
    configure_logging()
    servers: list[Server] = []  # each binds now: a bad address fails before the relay starts
    if web_bind is not None:
        with needs("web", "run --web"):  # the relay alone does not load the web stack
            from .web.serve import WebServer
        servers.append(WebServer(config, web_bind))
    if metrics_bind is not None:
        servers.append(MetricsServer(config, metrics_bind))
    run_forever(config, servers, workers=workers)


@main.command()
@click.option("--bind", metavar="HOST:PORT",
              help="Address to serve on (default: [web] bind, else 127.0.0.1:8080).")
@pass_context
@friendly_errors
def web(ctx: Context, bind: str | None) -> None:
    """Serve the web interface and REST API until SIGTERM/SIGINT.

    Auth: [web] token in the config or CDC_HOOKS_WEB_TOKEN; refuses a non-loopback
    address without one."""
    with needs("web", "cdc-hooks web"):  # the web stack loads only for this command
        from .web.serve import serve_forever

    config = ctx.config()
    configure_logging()
    serve_forever(config, bind)


def configure_logging(level: int = logging.INFO) -> None:
    """Logs to stderr in the --log-format of the command line being run."""
    click_context = click.get_current_context(silent=True)
    context = click_context.find_object(Context) if click_context else None
    logs.configure(context.log_format if context else "text", level)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [headers, *cells]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        click.echo("(none)")


@main.command("debug-receiver")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--secret", "secrets", multiple=True, metavar="whsec_...",
              help="Listener secret to verify signatures with (repeatable).")
@friendly_errors
def debug_receiver(port: int, host: str, secrets: tuple[str, ...]) -> None:
    """Print each webhook received and whether its signature verifies (answers 200)."""
    from .receiver import serve

    serve(host, port, secrets)


@main.command()
@click.option("--dsn", help="Run on this PostgreSQL (default: the configured one, else embedded).")
@click.option("--keep-running", is_flag=True, help="Keep relay and receiver running until Ctrl-C.")
@pass_context
@friendly_errors
def demo(ctx: Context, dsn: str | None, keep_running: bool) -> None:
    """See it work: durian's Person example on an embedded PostgreSQL, in seconds."""
    from .demo import run_demo

    if dsn:
        check_dsn(dsn, origin="--dsn")
    sys.exit(run_demo(dsn or ctx.config(required=False).dsn, keep_running=keep_running))


# Operations: retention and backfill (cdc_hooks/retention.py, backfill.py) --------


@main.command()
@pass_context
@friendly_errors
def prune(ctx: Context) -> None:
    """Delete what is past its [retention] now, after a listener health check
    (relays do both on a schedule)."""
    from . import maintenance

    config = ctx.config()
    with Database.connect(config.dsn) as db:
        done = maintenance.run_on(db, config)
        if not db.autovacuum_on():
            click.echo("warning: autovacuum is off on this server: the space pruned is reused "
                       "only after VACUUM of cdc_hooks' tables", err=True)
    if done is None:
        raise CdcHooksError("another prune is running (a relay's); try again later")
    for gone in done.disabled:
        click.echo(f"listener {gone.listener_id} disabled: {gone.reason}")
    click.echo(f"pruned {done.pruned}")


@main.command()
@click.argument("hook")
@click.option("--where", "condition", metavar="SQL-CONDITION",
              help="Only rows matching this SQL condition (trusted: pasted into the query).")
@click.option("--listener", "listener_id", type=int,
              help="Deliver to this listener only (even if it opted out of backfills).")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Rows per batch, each queued in its own short transaction.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming an interrupted run.")
@pass_context
@friendly_errors
def backfill(ctx: Context, hook: str, condition: str | None, listener_id: int | None,
             batch: int, restart: bool) -> None:
    """Send 'read' events for HOOK's existing rows; run again to resume."""
    from . import backfill as backfills

    with Database.connect(ctx.config().dsn) as db:
        job = backfills.start(db, hook, condition, listener_id, restart=restart)
        if job.resumed:
            click.echo(f"resuming backfill {job.id} after {job.rows_done} rows", err=True)
        total = max(backfills.estimate(db, job), job.rows_done)
        try:
            with click.progressbar(length=total, label=f"backfill {hook}", file=sys.stderr,
                                   show_pos=True) as bar:
                bar.update(job.rows_done)
                for rows in backfills.batches(db, job, batch):
                    bar.update(rows)
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted after {job.rows_done} rows: run the same command "
                       "again to resume", err=True)
            sys.exit(130)
    click.echo(f"backfill {job.id}: {job.rows_done} rows of {hook} queued as read events")
