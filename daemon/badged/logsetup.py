"""Logging for the daemon process only (libraries never configure logging).

Structured: every ``extra={...}`` field is emitted, as JSON (``json``) or as
``key=value`` pairs (``text``). Field values are whatever the code passed --
and the code never passes PINs, keys or credentials (reviewed: grep
``reveal()``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def iso_local(created: float, msecs: float) -> str:
    """ISO 8601 local time with milliseconds and UTC offset: 2026-12-07T01:02:03.456+01:00.

    A date and an offset, so lines from a long-running daemon (or from hosts
    in other zones) sort and compare without guessing.
    """
    tm = time.localtime(created)
    offset = time.strftime("%z", tm)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", tm) + f".{int(msecs):03d}"
            + f"{offset[:3]}:{offset[3:]}")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = iso_local(record.created, record.msecs)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            line += "  " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("badged")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
