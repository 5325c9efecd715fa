"""Whether each table hook still captures: its triggers are on its table and
every partition below it, enabled.

A table dropped and created again (Django's ``migrate app zero`` then
``migrate app``, test runners that recreate tables) has none of them: its
writes commit and nothing is captured. The relay checks every few seconds and
logs each hook that stops (or starts again) capturing, once per change;
``status`` lists such hooks and exits 1, the web overview shows them, and
/metrics has ``cdc_hooks_hook_capturing``. One catalog query (hooks_capturing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("cdc_hooks.relay")

REPAIR_HINT = ("run cdc-hooks install to put its triggers back (or set [database] "
               "repair_triggers = true to have them re-created whenever the table is)")


@dataclass(frozen=True)
class HookCapture:
    hook: str
    table: str  # schema.table
    problem: str | None  # why it does not capture; None: it does

    @property
    def capturing(self) -> bool:
        return self.problem is None

    @classmethod
    def from_row(cls, *, name: str, table_schema: str, table_name: str, table_exists: bool,
                 missing: list[str]) -> HookCapture:
        """From a row of the hooks_capturing query."""
        table = f"{table_schema}.{table_name}"
        problem = None
        if not table_exists:
            problem = f"table {table} does not exist"
        elif missing:
            problem = (f"trigger {', '.join(missing)} is missing (was the table dropped and "
                       "created again?)" if len(missing) == 1 else
                       f"triggers {', '.join(missing)} are missing (was the table dropped and "
                       "created again?)")
        return cls(name, table, problem)


class Watch:
    """Remembers what each hook was doing at the last check, to log a change
    once, not every round."""

    def __init__(self) -> None:
        self._problems: dict[str, str | None] = {}

    def note(self, states: list[HookCapture]) -> None:
        seen = {}
        for state in states:
            seen[state.hook] = state.problem
            before = self._problems.get(state.hook)
            if state.problem is not None and state.problem != before:
                log.error('hook "%s" is not capturing changes of %s: %s; writes to it commit '
                          "without events. %s", state.hook, state.table, state.problem,
                          REPAIR_HINT, extra={"hook": state.hook, "status": "not-capturing"})
            elif state.problem is None and before is not None:
                log.warning('hook "%s" is capturing changes of %s again', state.hook,
                            state.table, extra={"hook": state.hook, "status": "capturing"})
        self._problems = seen
