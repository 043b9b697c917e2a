"""Read a policy TOML file into :class:`~badged.policy.model.Policy`.

Every problem is reported as ``file:line: reason`` (ConfigError), so an
operator can fix it without guessing; the daemon keeps its last good policy
when a reload fails. Example (see docs/policy.example.toml)::

    [[bind]]
    agent = "deploy-bot"
    selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3.11"]
    audiences = ["https://api.example.com"]
    scopes = ["deploy:read"]
    kinds = ["token", "sign"]
    max_ttl = "10m"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from badged.errors import ConfigError
from badged.identity.registry import check_agent_name
from badged.policy.model import KINDS, Binding, Policy, parse_selector

MAX_TTL_CAP = 24 * 3600
_DURATION_RE = re.compile(r"^(\d+)(s|m|h)?$")
_BIND_HEADER = re.compile(r"^\s*\[\[\s*bind\s*\]\]")
_ALLOWED_KEYS = {"agent", "selectors", "audiences", "scopes", "kinds", "max_ttl", "description"}


def parse_duration(value: Any, *, what: str) -> int:
    """``300``, ``"300s"``, ``"5m"``, ``"1h"`` → seconds; bounded and positive."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration, not a boolean")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION_RE.match(value.strip())):
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    else:
        raise ValueError(f"{what} {value!r} is not a duration like 300, \"90s\", \"10m\", \"1h\"")
    if seconds <= 0:
        raise ValueError(f"{what} must be positive")
    if seconds > MAX_TTL_CAP:
        raise ValueError(f"{what} {seconds}s is above the hard cap of {MAX_TTL_CAP}s")
    return seconds


def _string_list(entry: dict[str, Any], key: str, *, required: bool) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a list of non-empty strings")
    if required and not value:
        raise ValueError(f"{key} must not be empty")
    return value


def _key_line(lines: list[str], start: int, key: str) -> int:
    """Line of ``key =`` within the table starting at ``start`` (1-based)."""
    pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i in range(start, len(lines)):
        if i > start and _BIND_HEADER.match(lines[i]):
            break
        if pat.match(lines[i]):
            return i + 1
    return start + 1


def parse_policy(text: str, source: str) -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"TOML syntax: {exc}", path=source,
                          line=int(m.group(1)) if m else None) from None
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if _BIND_HEADER.match(line)]
    unknown_top = set(doc) - {"bind"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise ConfigError(f"unknown top-level key {key!r} (expected [[bind]] tables)",
                          path=source, line=_key_line(lines, 0, key))
    entries = doc.get("bind", [])
    if not isinstance(entries, list):
        raise ConfigError("'bind' must be an array of tables ([[bind]])", path=source)
    bindings: list[Binding] = []
    for idx, entry in enumerate(entries):
        start = headers[idx] if idx < len(headers) else 0
        current_key = "agent"
        try:
            unknown = set(entry) - _ALLOWED_KEYS
            if unknown:
                current_key = sorted(unknown)[0]
                raise ValueError(f"unknown key {current_key!r}")
            current_key = "agent"
            agent = entry.get("agent")
            if not isinstance(agent, str):
                raise ValueError("agent is required and must be a string")
            check_agent_name(agent)
            current_key = "selectors"
            selectors = _string_list(entry, "selectors", required=True)
            for sel in selectors:
                parse_selector(sel)
            current_key = "kinds"
            kinds = _string_list(entry, "kinds", required=False) or ["token"]
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"unknown kinds {bad} (known: {', '.join(KINDS)})")
            current_key = "audiences"
            audiences = _string_list(entry, "audiences", required="token" in kinds)
            current_key = "scopes"
            scopes = _string_list(entry, "scopes", required=False)
            for s in scopes:
                if " " in s:
                    raise ValueError(f"scope {s!r} contains a space")
            current_key = "max_ttl"
            max_ttl = parse_duration(entry.get("max_ttl", 300), what="max_ttl")
        except Exception as exc:
            detail = getattr(exc, "public", None) or str(exc)
            raise ConfigError(f"[[bind]] #{idx + 1}: {detail}", path=source,
                              line=_key_line(lines, start, current_key)) from None
        bindings.append(Binding(
            agent=agent, selectors=frozenset(selectors), audiences=frozenset(audiences),
            scopes=frozenset(scopes), kinds=frozenset(kinds), max_ttl=max_ttl,
            source=f"{Path(source).name}:{start + 1}",
        ))
    return Policy(bindings=tuple(bindings), source=source)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy: {exc.strerror}", path=str(path)) from None
    return parse_policy(text, str(path))
