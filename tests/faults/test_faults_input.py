"""Bad input: each a clear one-line message, a non-zero exit, no traceback, and
nothing half-done (the database as it was).

tests/test_config.py and tests/test_capture.py already cover much of the
issue's list one command at a time (and fuzz the config loader and the
--match parser with hypothesis); here every case runs through the CLI
against a real database, which is compared before and after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from faultkit import World, delivery, record
from receivers import wait_until

from cdc_hooks.errors import CdcHooksError
from cdc_hooks.registry import send

pytestmark = pytest.mark.faults

PASSWORD = "S3cretPassw0rd"

HOOK = '[[hooks]]\nname = "person"\ntable = "person"\nprovides = ["name", "address"]\n'

# (case, config body, message fragment): `install` refuses, the database stays empty.
BAD_CONFIGS = [
    ("not TOML", "[[hooks]\nname = ", "not valid TOML"),
    ("unknown key, near miss", HOOK + "[delivery]\ntimeuot = 3\n",
     'unknown key "timeuot" (did you mean "timeout"?)'),
    ("unknown hook key", HOOK.replace("provides", "provide"),
     'unknown key "provide" (did you mean "provides"?)'),
    ("unknown event", HOOK + 'events = ["insert", "upsert"]\n', 'unknown event "upsert"'),
    ("duplicate hook name", HOOK + HOOK, "duplicate hook name"),
    ("missing table", HOOK.replace('table = "person"', 'table = "nope"'), "does not exist"),
    ("missing column", HOOK.replace('"address"', '"nope"'), 'column "nope" does not exist'),
    ("bad number", HOOK + "[delivery]\ntimeout = -1\n", "timeout must be between"),
    ("bad network", HOOK + '[delivery]\nallowed_networks = ["10.0.0.0/33"]\n', "is not a network"),
]

# (case, command line, message fragment, exit code) on an installed database.
BAD_COMMANDS = [
    ("unknown hook: listeners add", ["listeners", "add", "nope", "http://127.0.0.1:9/"],
     'unknown hook "nope"', 2),
    ("unknown hook: send", ["send", "nope", "message=x"], 'unknown hook "nope"', 2),
    ("table hook: send", ["send", "person", "name=x"], 'hook "person" is bound to table', 2),
    ("field not provided: send", ["send", "myhook", "secret=x"], "does not provide secret", 2),
    ("field not provided: --match", ["listeners", "add", "person", "http://127.0.0.1:9/",
                                     "--match", "secret=x"], 'hook "person" does not provide it', 2),
    ("unknown operator", ["listeners", "add", "person", "http://127.0.0.1:9/", "--match",
                          "name=startwith:J"], 'unknown operator "startwith"', 2),
    ("operator in capitals", ["listeners", "add", "person", "http://127.0.0.1:9/", "--match",
                              "name=StartsWith:J"], 'unknown operator "StartsWith"', 2),
    ("unknown operator, JSON form", ["listeners", "add", "person", "http://127.0.0.1:9/",
                                     "--match", 'name:={"$regex": "^J"}'], "--match", 2),
    ("regex that does not compile", ["listeners", "add", "person", "http://127.0.0.1:9/",
                                     "--match", "name=like:(unclosed"], "does not compile", 2),
    ("malformed --match", ["listeners", "add", "person", "http://127.0.0.1:9/", "--match",
                           "name"], "expected FIELD=VALUE", 2),
    ("ftp URL", ["listeners", "add", "person", "ftp://example.com/"], "must be http:// or https://", 2),
    ("file URL", ["listeners", "add", "person", "file:///etc/passwd"], "must be http:// or https://", 2),
    ("javascript URL", ["listeners", "add", "person", "javascript:alert(1)"],
     "must be http:// or https://", 2),
    ("URL without host", ["listeners", "add", "person", "http:///hook"], "has no host", 2),
    ("URL with a bad port", ["listeners", "add", "person", "http://127.0.0.1:99999/"],
     "invalid port", 2),
    ("bad secret", ["listeners", "add", "person", "http://127.0.0.1:9/", "--secret", "whsec_!!"],
     "whsec_ followed by base64", 2),
    ("rate of 0", ["listeners", "add", "person", "http://127.0.0.1:9/", "--rate", "0"],
     "rate must be a number of deliveries per second from 0.001 to 100000, not 0.0", 2),
    ("absurd rate", ["listeners", "add", "person", "http://127.0.0.1:9/", "--rate", "1e12"],
     "rate must be a number of deliveries per second", 2),
    ("not JSON: NaN", ["send", "myhook", "n:=NaN"], "is not JSON", 2),
    ("not JSON: Infinity", ["send", "myhook", "n:=-Infinity"], "is not JSON", 2),
    ("not JSON: truncated", ["send", "myhook", "message:=[1,"], "is not JSON", 2),
    ("not JSON: --match", ["listeners", "add", "person", "http://127.0.0.1:9/", "--match",
                           "name:=NaN"], "is not JSON", 2),
    ("number PostgreSQL cannot hold", ["send", "myhook", "n:=1e999999"], "numeric", 1),
    ("field without a value", ["send", "myhook", "message"], "expected KEY=VALUE", 2),
    ("unknown listener: pause", ["listeners", "pause", "999"], "no listener with id 999", 1),
    ("unknown listener: remove", ["listeners", "remove", "999"], "no listener with id 999", 1),
    ("unknown delivery: redeliver", ["redeliver", "999"], "no delivery with id 999", 1),
    ("redeliver what?", ["redeliver"], "give a DELIVERY_ID", 2),
    ("backfill of an unknown hook", ["backfill", "nope"], 'unknown hook "nope"', 2),
]

UNREACHABLE = [
    f"postgresql://alice:{PASSWORD}@127.0.0.1:1/app",
    f"host=127.0.0.1 port=1 user=alice password={PASSWORD} dbname=app",
]
COMMANDS = [["install"], ["check"], ["status"], ["listeners", "list"],
            ["listeners", "add", "person", "http://127.0.0.1:9/"], ["send", "myhook", "n:=1"],
            ["deliveries"], ["redeliver", "1"], ["prune"]]


# Each case's outcome as the tests below ran it: True once refused cleanly and the
# database left as it was. test_bad_input_figure, last, sums them into the figure.
OUTCOMES: dict[str, bool] = {}
CASES = len(BAD_CONFIGS) + len(BAD_COMMANDS) + len(COMMANDS) * len(UNREACHABLE) + 5


@contextmanager
def outcome(case: str) -> Iterator[None]:
    """Records the case as lost unless the block's assertions all hold."""
    OUTCOMES[case] = False
    yield
    OUTCOMES[case] = True


def snapshot(world: World) -> tuple[object, ...]:
    """What a refused command must leave as it was."""
    if not world.scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'cdc_hooks')"):
        return ("no schema",)
    return world.conn.execute(
        "SELECT (SELECT count(*) FROM cdc_hooks.hooks), (SELECT count(*) FROM cdc_hooks.listeners),"
        " (SELECT count(*) FROM cdc_hooks.outbox), (SELECT count(*) FROM cdc_hooks.events),"
        " (SELECT count(*) FROM cdc_hooks.deliveries),"
        " (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cdc\\_hooks\\_%%')").fetchone()


def assert_refused(result: object, fragment: str, code: int, case: str = "") -> None:
    output = result.output  # type: ignore[attr-defined]
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == code, (case, output)  # type: ignore[attr-defined]
    assert "Traceback" not in output, case
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
    assert fragment in lines[0], (case, fragment, lines[0])


def test_a_bad_config_installs_nothing(world):
    world.setup("", install=False)
    assert world.config is not None and world.config.path is not None
    for case, body, fragment in BAD_CONFIGS:  # one database for all: each must leave it empty
        world.config.path.write_text(f'[database]\ndsn = "{world.dsn}"\n{body}', encoding="utf-8")
        with outcome(f"config: {case}"):
            assert_refused(world.cli("install"), fragment, 2, case)
            assert snapshot(world) == ("no schema",), case


def test_a_bad_command_changes_nothing(world):
    world.setup(delivery())  # loopback URLs allowed: each case fails for its own reason
    before = snapshot(world)
    for case, args, fragment, code in BAD_COMMANDS:
        with outcome(f"command: {case}"):
            assert_refused(world.cli(*args), fragment, code, case)
            assert snapshot(world) == before, case


@pytest.mark.parametrize("dsn", UNREACHABLE, ids=["url", "keywords"])
def test_an_unreachable_database_is_named_without_its_password(world, dsn):
    world.setup("", install=False)
    assert world.config is not None and world.config.path is not None
    world.config.path.write_text(f'[database]\ndsn = "{dsn}"\n{HOOK}\n[[hooks]]\nname = "myhook"\n'
                                 'provides = ["n"]\n', encoding="utf-8")
    for args in COMMANDS:
        with outcome(f"unreachable: {dsn.partition(PASSWORD)[0]} {args}"):
            result = world.cli(*args)
            assert_refused(result, "cannot connect to PostgreSQL at 127.0.0.1:1/app", 1)
            assert PASSWORD not in result.output, args


def test_the_relay_names_an_unreachable_database_without_its_password(world, relays):
    world.setup("", install=False)
    assert world.config is not None and world.config.path is not None
    world.config.path.write_text(f'[database]\ndsn = "{UNREACHABLE[0]}"\n{HOOK}', encoding="utf-8")
    relay = relays(world, wait_connected=False)
    wait_until(lambda: "unavailable" in relay.log(), message="the relay reports the outage")
    assert relay.terminate(timeout=20) == 0
    log = relay.log()
    assert "127.0.0.1:1/app" in log and PASSWORD not in log and "Traceback" not in log, log


# A datetime or a NaN has a PostgreSQL form, as a table column would carry it (tests/test_values.py).
@pytest.mark.parametrize("value", [object(), {1: "one"}, "nul\x00", {1, 2}, 1j],
                         ids=["object", "int key", "NUL", "set", "complex"])
def test_python_values_that_are_not_json_are_refused(world, value):
    config = world.setup(delivery())
    with outcome(f"send: {type(value).__name__} {value!r:.20}"):
        with pytest.raises(CdcHooksError) as refused:
            send("myhook", {"n": value}, config=config)
        assert len(str(refused.value).splitlines()) == 1
        assert str(refused.value).startswith('send "myhook": "n" ')  # names the key
        assert world.scalar("SELECT count(*) FROM cdc_hooks.outbox") == 0


def test_bad_input_figure():
    """Last in the file: the cases above, as they ran. Lost: a case not refused
    cleanly, or one that changed the database."""
    if len(OUTCOMES) < CASES:
        pytest.skip(f"the figure sums this file's {CASES} cases; {len(OUTCOMES)} ran")
    lost = [case for case, held in OUTCOMES.items() if not held]
    record("Bad input", f"{len(BAD_CONFIGS)} bad configs, {len(BAD_COMMANDS)} bad commands, "
           f"{len(COMMANDS)} commands x {len(UNREACHABLE)} unreachable DSNs, 5 non-JSON values",
           events=len(OUTCOMES), faults=len(OUTCOMES), lost=len(lost),
           notes="each refused with one 'error:' line and a non-zero exit, no traceback, "
                 "the database unchanged; the DSN's password never shown")
    assert len(OUTCOMES) == CASES and not lost, lost
