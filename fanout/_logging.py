"""Log lines on stderr: text (``2026-12-03 18:00:00,123 INFO fanout.daemon: ...``) or, with
``--log-format json``, one JSON object per line with ``event``, ``ts`` (ISO 8601, UTC),
``level`` and ``logger``, and a structured record's fields (``extra={"fields": {...}}``),
so a log shipper parses every line the same way: status reports, warnings, the SIGTERM
drain and fatal errors alike."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
_json = False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        event = getattr(record, "event", None) or record.getMessage()
        out: dict[str, Any] = {
            "event": event,
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **fields,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str = "text", level: str | None = None, *, verbose: bool = False,
              default: str = "warning") -> None:
    """The root logger on stderr: ``fmt`` text or json, at ``level`` (``-v``: debug)."""
    global _json
    root = logging.getLogger()
    if root.handlers:  # as logging.basicConfig: a host (a test runner, an app) configured it
        return
    _json = fmt == "json"
    name = "debug" if verbose else (level or default)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, name.upper()))


def is_json() -> bool:
    return _json


def fatal(command: str, message: str) -> None:
    """A command's last word before it exits: ``fanout run: error: ...`` in text, an
    ``error`` record in JSON."""
    if _json:
        text = f"fanout {command}: error: {message}"  # the text line, as a field too
        logging.getLogger("fanout").error("%s", text, extra={
            "event": "error", "fields": {"error": message, "message": text}})
    else:
        print(f"fanout {command}: error: {message}", file=sys.stderr, flush=True)
