"""Log output of long-running commands (run, web): text for people, or one JSON
object per line (``--log-format json``) for log collectors.

A JSON line has time (UTC, ISO 8601), level, logger and message, plus the
fields a call passed with ``extra=`` (listener_id, event_id, attempt,
status, ...) and the traceback as ``exception``. Messages are the same as in
text: nothing secret goes into a message or a field (listener secrets, DSN
passwords and tokens are never passed to the logger).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [worker %(worker)s]: %(message)s"

# Attributes every LogRecord has: anything else on a record came from extra=
# (but uvicorn's color_message: the message again, with terminal escapes).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: a field that is not JSON (a datetime, a Decimal) still makes one line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Routes every logger (ours, uvicorn's, aiohttp's) to stderr in the given format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _WorkerLabel(logging.Filter):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.number
        return True


def label_worker(number: int) -> None:
    """Marks what this process logs as worker `number`'s (run --workers N): in text
    after the logger's name, in JSON as a "worker" field."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLabel(number))
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT))


def current_format() -> str:
    """The format configure() set (worker processes log in it too)."""
    json_handlers = (h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    return "json" if any(json_handlers) else "text"
