"""Hooks declared in Python (issue 16): a Django and a SQLAlchemy model whose hooks are
installed from [python] modules, written to through each ORM and delivered to a real
loopback receiver with durian's three listeners; every bad declaration refused with
the message a bad [[hooks]] entry gets, naming the module and class.
"""

from __future__ import annotations

import hashlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from receivers import InProcessRelay, Receiver, wait_until
from sqlalchemy.orm import Session

from cdc_hooks import Hook, ModelHook, Startswith, hooks
from cdc_hooks.config import load_config
from cdc_hooks.errors import ConfigError

DELIVERY = "\n[delivery]\nallow_private_networks = true\nretry_schedule = [0.2]\n"
APP = '[python]\nmodules = ["hookproject.webhooks"]\n' + DELIVERY


@pytest.fixture(scope="session")
def django_db(django_settings: None) -> None:
    """Django's settings, on the run's database (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The global registry and the imported hook modules as they were before the test."""
    declared = {hook.name for hook in hooks.declared()}
    modules = set(sys.modules)
    monkeypatch.setattr(hooks, "_config", None)
    yield
    for hook in hooks.declared():
        if hook.name not in declared:
            hooks.unregister(hook.name)
    for name in set(sys.modules) - modules:
        if name == "hookproject.webhooks" or name.startswith("declared_"):
            del sys.modules[name]


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> str:
    """A module of hooks, importable by name for this test."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def config_file(tmp_path: Path, dsn: str, body: str) -> Path:
    """A config that may not load (make_config would load it)."""
    path = tmp_path / "cdc_hooks.toml"
    path.write_text(f'[database]\ndsn = "{dsn}"\n\n{body}', encoding="utf-8")
    return path


# Installed from [python] modules, delivered ------------------------------------


@pytest.fixture
def app_tables(conn: psycopg.Connection[Any], django_db: None,
               clean_db: str) -> Iterator[sqlalchemy.Engine]:
    """The application's tables, created by each ORM; the SQLAlchemy engine."""
    from django.db import connection as django_connection
    from hookproject.models import Base, Person

    with django_connection.schema_editor() as editor:
        editor.create_model(Person)
    conn.execute("CREATE SCHEMA crm")
    engine = sqlalchemy.create_engine("postgresql+psycopg://",
                                      creator=lambda: psycopg.connect(clean_db),
                                      poolclass=sqlalchemy.pool.NullPool)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
    django_connection.close()  # the next test's clean_db ends sessions it finds


def durians_listeners(hook: ModelHook, receiver: Receiver, prefix: str) -> None:
    """The three listeners of durian's README, through its fluent API."""
    hook.listener(url=receiver.url(f"/{prefix}/joe")).match(name="Joe").save()
    hook.listener(url=receiver.url(f"/{prefix}/j")).match(name=Startswith("J")).save()
    hook.listener(url=receiver.url(f"/{prefix}/all")).save()


def test_hooks_on_django_and_sqlalchemy_models_are_installed_and_delivered(
        app_tables, make_config, cli, conn, receiver):
    config = make_config(APP)
    installed = cli(config, "install")
    assert installed.exit_code == 0, installed.output
    assert "+ person: insert, update on public.hookproject_person providing name, street_address" \
        in installed.stdout
    assert "+ member: insert, update, delete on crm.Members providing full_name, city" \
        in installed.stdout
    assert "+ myhook: custom hook providing name, address" in installed.stdout
    assert "+ audit: custom hook providing message" in installed.stdout
    assert cli(config, "check").exit_code == 0

    from hookproject.models import Member, Person
    from hookproject.webhooks import AuditHook, MemberHook, PersonHook

    hooks.configure(config)
    durians_listeners(PersonHook(), receiver, "person")
    durians_listeners(MemberHook(), receiver, "member")  # name: the attribute of column full_name
    Hook("myhook").listener(url=receiver.url("/custom")).save()
    AuditHook().listener(url=receiver.url("/custom")).save()

    for name in ("Joe", "Jane", "Bob"):
        Person.objects.create(name=name, address=f"{name} Street", secret="s3cret")
    bob = Person.objects.get(name="Bob")
    bob.name = "Jim"
    bob.save()
    Person.objects.filter(name="Jane").update(secret="other")  # nothing provided changed
    with Session(app_tables) as session:
        session.add_all([Member(member_id=i, name=n, city="Oslo", secret="s3cret")
                         for i, n in enumerate(("Joe", "Jane", "Bob"), 1)])
        session.commit()
        session.delete(session.get(Member, 2))
        session.commit()
    Hook("myhook").send(sender=None, name="George Costanza", address="New York City")
    AuditHook().send(sender=None, message="done")

    relay = InProcessRelay(config).start()
    try:
        receiver.wait_for(4 + 3 + 1 + 4 + 3 + 1 + 2)
        wait_until(lambda: conn.execute("SELECT count(*) FROM cdc_hooks.deliveries "
                                        "WHERE status <> 'delivered'").fetchone() == (0,))
    finally:
        relay.stop()

    def got(path: str) -> list[tuple[str, str]]:  # a listener's deliveries may overtake each other
        return sorted((b["event"], b["data"].get("name") or b["data"]["full_name"])
                      for b in receiver.bodies(path))

    assert got("/person/joe") == [("insert", "Joe")]
    assert got("/person/j") == [("insert", "Jane"), ("insert", "Joe"), ("update", "Jim")]
    assert got("/person/all") == [("insert", "Bob"), ("insert", "Jane"), ("insert", "Joe"),
                                  ("update", "Jim")]
    first = receiver.bodies("/person/joe")[0]
    assert first["data"] == {"name": "Joe", "street_address": "Joe Street"}  # no secret
    assert first["key"] == {"id": Person.objects.get(name="Joe").pk}
    assert got("/member/joe") == [("insert", "Joe")]
    assert got("/member/j") == [("delete", "Jane"), ("insert", "Jane"), ("insert", "Joe")]
    assert got("/member/all") == [("delete", "Jane"), ("insert", "Bob"), ("insert", "Jane"),
                                  ("insert", "Joe")]
    joe = receiver.bodies("/member/joe")[0]
    assert (joe["key"], joe["data"]) == ({"member_id": 1}, {"full_name": "Joe", "city": "Oslo"})
    assert sorted((b["hook"], b["data"]) for b in receiver.bodies("/custom")) == [
        ("audit", {"message": "done"}),
        ("myhook", {"name": "George Costanza", "address": "New York City"})]


def test_the_modules_come_from_the_environment_too(app_tables, make_config, cli, monkeypatch):
    config = make_config(DELIVERY)
    monkeypatch.setenv("CDC_HOOKS_MODULES", " hookproject.webhooks , ")
    assert [h.name for h in load_config(config.path).hooks] == ["person", "member", "myhook", "audit"]
    installed = cli(config, "install")
    assert installed.exit_code == 0 and "+ person:" in installed.stdout, installed.output


def test_a_hook_on_a_table_name_and_the_model_kinds(conn, make_config, tmp_path, monkeypatch):
    conn.execute('CREATE TABLE "Orders" (id int PRIMARY KEY, total numeric, note text)')
    module = write_module(tmp_path, monkeypatch, "declared_kinds", """
        import sqlalchemy
        from cdc_hooks import Hook, ModelHook, hooks

        orders = sqlalchemy.Table("Orders", sqlalchemy.MetaData(),
                                  sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
                                  sqlalchemy.Column("total", sqlalchemy.Numeric))

        class OrderTable(ModelHook):
            name = "orders"
            model = orders
            provides_args = ["total"]
            when_changed = ["total"]

        class OrderName(ModelHook):
            name = "orders_by_name"
            table = 'public."Orders"'
            key = ["id"]

        hooks.register(OrderTable)
        hooks.register(OrderName)
        hooks.register(Hook(name="notify", provides_args=["order"], senders=["shop"]))
    """)
    config = make_config(f'[python]\nmodules = ["{module}"]\n')
    by_table, by_name, notify = config.hooks
    assert (notify.provides, notify.senders, notify.origin) == (
        ("order",), ("shop",), "Hook('notify') in declared_kinds")
    assert (str(by_table.table), by_table.key, by_table.provides, by_table.when_changed) == \
        ('public."Orders"', ("id",), ("total",), ("total",))
    assert by_table.origin == "declared_kinds.OrderTable"
    assert (str(by_name.table), by_name.key, by_name.provides) == ('public."Orders"', ("id",), None)


# Bad declarations ------------------------------------------------------------

PERSON = "CREATE TABLE person (id serial PRIMARY KEY, name text, address text)"


def refused(cli: Callable[..., Any], path: Path, *args: str) -> str:
    """The one error line of a command that must refuse the config."""
    result = cli(path, *(args or ("install",)))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def toml_error(cli: Callable[..., Any], tmp_path: Path, dsn: str, entry: str) -> str:
    """What the same hook declared as a [[hooks]] entry is refused with."""
    return refused(cli, config_file(tmp_path / "toml", dsn, f"[[hooks]]\n{entry}"))


@pytest.fixture
def toml_dir(tmp_path: Path) -> Path:
    (tmp_path / "toml").mkdir()
    return tmp_path


def model_hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """A module registering class PersonHook(ModelHook) named "person", with body."""
    name = "declared_" + hashlib.sha1(body.encode()).hexdigest()[:8]
    source = ("from cdc_hooks import ModelHook, hooks\n\n"
              'class PersonHook(ModelHook):\n    name = "person"\n'
              + textwrap.indent(body, "    ") + "\n\nhooks.register(PersonHook)\n")
    return write_module(tmp_path, monkeypatch, name, source)


@pytest.mark.parametrize(("declaration", "entry"), [
    ('table = "person"\nevents = ["insert", "upsert"]', 'events = ["insert", "upsert"]'),
    ('table = "person"\nprovides_args = ["name", "bogus"]', 'provides = ["name", "bogus"]'),
    ('table = "person"\nprovides_args = "name"', 'provides = "name"'),
    ('table = "person"\nevents = ["delete"]\nwhen_changed = ["name"]',
     'events = ["delete"]\nwhen_changed = ["name"]'),
    ('table = "person"\nkey = ["nosuch"]', 'key = ["nosuch"]'),
    ('table = "person"\nsenders = ["app"]', 'senders = ["app"]'),
    ('table = "nosuch"', None),
])
def test_a_bad_model_hook_is_refused_as_the_same_toml_entry_is(
        conn, clean_db, cli, toml_dir, monkeypatch, declaration, entry):
    conn.execute(PERSON)
    module = model_hook_module(toml_dir, monkeypatch, declaration)
    path = config_file(toml_dir, clean_db, f'[python]\nmodules = ["{module}"]\n')
    table = 'table = "person"\n' if entry else 'table = "nosuch"\n'
    expected = toml_error(cli, toml_dir, clean_db, f'name = "person"\n{table}{entry or ""}')
    assert refused(cli, path) == expected.replace(
        'hook "person"', f'hook "person" ({module}.PersonHook)')
    assert conn.execute("SELECT to_regnamespace('cdc_hooks')").fetchone() == (None,)  # nothing done


def test_a_custom_hook_must_say_what_it_provides(clean_db, cli, toml_dir, monkeypatch):
    module = write_module(toml_dir, monkeypatch, "declared_custom", """
        from cdc_hooks import Hook, hooks

        hooks.register(Hook(name="myhook"))
    """)
    path = config_file(toml_dir, clean_db, f'[python]\nmodules = ["{module}"]\n')
    assert refused(cli, path) == toml_error(cli, toml_dir, clean_db, 'name = "myhook"').replace(
        'hook "myhook"', "hook \"myhook\" (Hook('myhook') in declared_custom)")


@pytest.mark.parametrize(("body", "message"), [
    ("pass", "a ModelHook needs a model or a table"),
    ('table = "person"\nmodel = object()', "give a model or a table, not both"),
    ("model = 42", "model must be a SQLAlchemy mapped class or Table, or a Django model (got 42)"),
])
def test_a_model_hook_needs_one_model_or_table(clean_db, cli, tmp_path, monkeypatch, body, message):
    module = model_hook_module(tmp_path, monkeypatch, body)
    path = config_file(tmp_path, clean_db, f'[python]\nmodules = ["{module}"]\n')
    assert refused(cli, path, "check") == f'hook "person" ({module}.PersonHook): {message}'


def test_a_name_declared_twice_is_refused(conn, clean_db, cli, tmp_path, monkeypatch):
    conn.execute(PERSON)
    write_module(tmp_path, monkeypatch, "declared_once", """
        from cdc_hooks import ModelHook, hooks

        class PersonHook(ModelHook):
            name = "person"
            table = "person"

        hooks.register(PersonHook)
    """)
    write_module(tmp_path, monkeypatch, "declared_twice", """
        from cdc_hooks import Hook, hooks

        class OtherHook(Hook):
            name = "person"
            provides_args = ["x"]

        hooks.register(OtherHook)
    """)
    both = config_file(tmp_path, clean_db, '[python]\nmodules = ["declared_once"]\n\n'
                       '[[hooks]]\nname = "person"\ntable = "person"\n')
    assert refused(cli, both) == ('hook "person" (declared_once.PersonHook): duplicate hook name '
                                  "(also declared in [[hooks]])")
    twice = config_file(tmp_path, clean_db, '[python]\nmodules = ["declared_once", "declared_twice"]\n')
    assert refused(cli, twice) == (
        "[python] modules: cannot import declared_twice: ConfigError: hook \"person\" "
        "(declared_twice.OtherHook): duplicate hook name (also declared in declared_once.PersonHook)")


@pytest.mark.parametrize("command", [("install",), ("check",), ("listeners", "list"), ("run",),
                                     ("web",), ("send", "myhook", "a=1")])
def test_a_module_that_fails_to_import_is_one_error_line_for_every_command(
        clean_db, cli, tmp_path, monkeypatch, command):
    write_module(tmp_path, monkeypatch, "declared_broken", """
        from cdc_hooks import hooks

        settings = {}
        DEBUG = settings["DEBUG"]
    """)
    path = config_file(tmp_path, clean_db, '[python]\nmodules = ["declared_broken"]\n')
    assert refused(cli, path, *command) == \
        "[python] modules: cannot import declared_broken: KeyError: 'DEBUG'"


@pytest.mark.parametrize(("modules", "message"), [
    ('["declared_missing"]',
     "[python] modules: cannot import declared_missing: ModuleNotFoundError: "
     "No module named 'declared_missing'"),
    ('["my-app.hooks"]', '[python] modules: "my-app.hooks" is not a module name (such as myapp.webhooks)'),
    ('"myapp"', '[python] modules must be an array of module names, such as ["myapp.webhooks"]'),
])
def test_bad_module_lists_are_refused(clean_db, cli, tmp_path, modules, message):
    path = config_file(tmp_path, clean_db, f"[python]\nmodules = {modules}\n")
    assert refused(cli, path, "check") == message


def test_a_syntax_error_names_the_module_and_line(clean_db, cli, tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "declared_syntax", "class PersonHook(:\n    pass\n")
    path = config_file(tmp_path, clean_db, '[python]\nmodules = ["declared_syntax"]\n')
    assert refused(cli, path).startswith(
        "[python] modules: cannot import declared_syntax: SyntaxError: ")


def test_field_names_of_a_django_model_map_to_their_columns(django_db):
    from hookproject.models import Person
    from hookproject.webhooks import PersonHook

    class Bad(PersonHook):
        name = "bad"
        provides_args = ("address", "bogus")  # left for install to refuse against the table

    assert PersonHook().to_config().provides == ("name", "street_address")
    assert Bad().to_config().provides == ("street_address", "bogus")
    assert PersonHook().to_config().table.name == Person._meta.db_table  # type: ignore[union-attr]


def test_without_modules_nothing_registered_becomes_config(make_config):
    hooks.register(Hook(name="stray", provides_args=["x"]))
    assert make_config("").hooks == ()
    with pytest.raises(ConfigError, match=r'hook "stray" .* duplicate hook name'):
        hooks.register(Hook(name="stray", provides_args=["y"]))
