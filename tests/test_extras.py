"""A light install: the relay, the CLI and the Python API import without the web
stack or the embedded PostgreSQL, and a command that needs a missing extra says
which one to install, in one line.

Each case runs in a subprocess whose imports of the extras' modules fail, as they
do where the extra is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cdc_hooks.extras import EXTRAS

# Run before the code under test: None in sys.modules is how Python says a module is
# not there (import raises ModuleNotFoundError naming it, find_spec answers None).
BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.modules.update(dict.fromkeys(BLOCKED))
""")
WITHOUT_EXTRAS = sorted(EXTRAS["web"] | EXTRAS["embedded"])


def without(blocked: list[str], code: str, **options: Any) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          **options)


def test_the_relay_cli_and_python_api_import_without_any_extra() -> None:
    result = without(WITHOUT_EXTRAS, """
        import cdc_hooks, cdc_hooks.cli, cdc_hooks.relay.relay, cdc_hooks.client, cdc_hooks.backfill
        import cdc_hooks.metrics, cdc_hooks.receiver, cdc_hooks.demo, cdc_hooks.install
        loaded = sorted(m for m in BLOCKED if sys.modules[m] is not None)
        print("loaded:", loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


def cli(blocked: list[str], args: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a folder whose config names a DSN nothing answers on; none for the demo
    (which would run on it)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(folder)}
    if args[0] != "demo":
        (folder / "cdc_hooks.toml").write_text('[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n')
    return without(blocked, f"""
        from cdc_hooks.cli import main
        sys.argv = ["cdc-hooks", *{args!r}]
        main()
    """, env=env, cwd=folder)


@pytest.mark.parametrize(("args", "extra", "what"), [
    (["web", "--bind", "127.0.0.1:0"], "web", "cdc-hooks web"),
    (["run", "--web", "127.0.0.1:0"], "web", "run --web"),
    (["demo"], "embedded", "the demo without --dsn"),
])
def test_a_command_names_the_extra_it_needs(args: list[str], extra: str, what: str,
                                            tmp_path: Path) -> None:
    result = cli(sorted(EXTRAS[extra]), args, tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {what} needs the '{extra}' extra ({sorted(EXTRAS[extra])[0]} is not installed): "
        f"pip install 'cdc-hooks[{extra}]'"], result.stderr
