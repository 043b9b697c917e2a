"""Every error of a policy file, and what it names that this host does not have
(``badgectl policy check``, ``badged check`` and the start-up checks).

The daemon's loader (``badged.policy.loader``) stops at the first error, which
is right for the daemon (an invalid file is refused whole) but slow for an
operator fixing a file. This check re-runs the loader with each failing table
blanked out (line numbers kept), so one run reports every independent error.
Then it warns about selectors naming users, groups, uids or paths that do
not exist here: legal (the policy may be shared between hosts), but usually
a typo that makes a rule match nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ROUNDS = 100
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_UNKNOWN_KEY = re.compile(r"unknown key '([^']+)'")


@dataclass(frozen=True)
class Finding:
    line: int | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "message": self.message}


@dataclass
class Report:
    path: str
    errors: list[Finding]
    warnings: list[Finding]
    agents: int = 0
    bundles: int = 0
    # The policy exactly as the daemon loads this text (set when there is no
    # error): start-up checks the file, then the daemon uses this instead of
    # parsing it again (badged.preflight.checked_policy).
    policy: Any = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "agents": self.agents, "bundles": self.bundles,
                "errors": [e.as_dict() for e in self.errors],
                "warnings": [w.as_dict() for w in self.warnings]}


def _blocks(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first, end, table name) of every table, 0-based, end exclusive."""
    heads = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _HEADER.match(line))]
    return [(start, heads[n + 1][0] if n + 1 < len(heads) else len(lines), name)
            for n, (start, name) in enumerate(heads)]


def _real_line(lines: list[str], line: int | None, message: str) -> int | None:
    """The loader names a nested table by its parent's header: find the table itself."""
    m = _UNKNOWN_KEY.search(message)
    if m is None or line is None:
        return line
    key = m.group(1)
    if 0 < line <= len(lines) and re.match(rf'^\s*"?{re.escape(key)}"?\s*=', lines[line - 1]):
        return line
    for start, _end, name in _blocks(lines):
        if start >= line - 1 and (name == key or name.endswith(f".{key}")):
            return start + 1
    return line


def _blank(lines: list[str], line: int) -> bool:
    """Comment out the table holding ``line`` and its sub-tables; False if none."""
    blocks = _blocks(lines)
    owner = next(((s, e, n) for s, e, n in blocks if s <= line - 1 < e), None)
    if owner is None:
        return False
    _s, _e, name = owner
    changed = False
    for s, e, n in blocks:
        if (s, e, n) == owner or (n.startswith(name + ".") and s >= owner[0]):
            for i in range(s, e):
                if lines[i] and not lines[i].startswith("#"):
                    lines[i] = "# " + lines[i]
                    changed = True
    return changed


def _agent_number(original: list[str], line: int | None, message: str) -> str:
    """Keep ``[[agent]] #N`` true to the file after earlier agents were blanked."""
    m = re.match(r"\[\[agent\]\] #\d+", message)
    if m is None or line is None:
        return message
    n = sum(1 for text in original[:line] if re.match(r"^\s*\[\[\s*agent\s*\]\]", text))
    return f"[[agent]] #{n}" + message[m.end():]


def _errors(text: str, source: str, doc: dict[str, Any] | None = None
            ) -> tuple[list[Finding], Any]:
    """Every error, and the policy when there is none (parsed from ``text``
    itself, ``doc`` being its TOML, as the daemon's loader would)."""
    from badged.errors import ConfigError
    from badged.policy.loader import parse_policy

    original = text.splitlines()
    lines = list(original)
    found: list[Finding] = []
    broken: dict[str, int] = {}  # bundle name -> line of its own error
    for round_ in range(MAX_ROUNDS):
        try:
            policy = (parse_policy(text, source, doc=doc) if round_ == 0 else
                      parse_policy("\n".join(lines) + "\n", source))
        except ConfigError as exc:
            message = exc.detail.split(": ", 1)[1] if exc.detail.startswith(source) else exc.detail
            line = _real_line(lines, exc.line, message)
            message = _agent_number(original, line, message)
            ref = re.search(r"unknown bundle '([^']+)'", message)
            if ref and ref.group(1) in broken:
                message += f" (it is invalid: line {broken[ref.group(1)]})"
            own = re.match(r"bundle '([^']+)'", message)
            if own and line is not None:
                broken[own.group(1)] = line
            found.append(Finding(line, message))
            if exc.line is None or message.startswith("TOML syntax") or not _blank(lines, exc.line):
                break
        else:
            return sorted(found, key=lambda f: f.line or 0), policy
    return sorted(found, key=lambda f: f.line or 0), None


def _line_of(text: str, needle: str, quoted: dict[str, int] | None = None) -> int | None:
    if quoted is not None and needle in quoted:
        return quoted[needle]
    for i, line in enumerate(text.splitlines()):
        if f'"{needle}"' in line or f"'{needle}'" in line:
            return i + 1
    return None


_QUOTED = re.compile(r"\"([^\"\n]*)\"|'([^'\n]*)'")


def _quoted_lines(text: str) -> dict[str, int]:
    """Each quoted string -> the first line it is on: one pass for every warning
    (a scan per warning made 10,000 rules for unknown uids take ~80 s; issue 22)."""
    out: dict[str, int] = {}
    for i, line in enumerate(text.splitlines()):
        for m in _QUOTED.finditer(line):
            out.setdefault(m.group(1) if m.group(1) is not None else m.group(2), i + 1)
    return out


def _selector_warnings(text: str, doc: dict[str, Any] | None = None) -> list[Finding]:
    """``doc``: ``text`` already parsed (start-up parses once for everything)."""
    if doc is None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return []
    selectors: list[str] = []
    for entry in doc.get("agent", []) if isinstance(doc.get("agent"), list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("selectors"), list):
            selectors += [s for s in entry["selectors"] if isinstance(s, str)]
    delegation = doc.get("delegation")
    if isinstance(delegation, dict) and isinstance(delegation.get("allow"), list):
        selectors += [s for s in delegation["allow"] if isinstance(s, str)]
    out: list[Finding] = []
    quoted: dict[str, int] | None = None
    for sel in dict.fromkeys(selectors):
        problem = _selector_problem(sel)
        if problem:
            if quoted is None:
                quoted = _quoted_lines(text)
            out.append(Finding(_line_of(text, sel, quoted), f"{sel}: {problem}"))
    return out


def _selector_problem(sel: str) -> str | None:
    kind, _, value = sel.partition(":")
    if kind != "unix":
        return None
    what, _, arg = value.partition(":")
    try:
        if what == "user":
            pwd.getpwnam(arg)
        elif what == "group":
            grp.getgrnam(arg)
        elif what == "uid" and arg.isdigit():
            pwd.getpwuid(int(arg))
        elif what == "gid" and arg.isdigit():
            grp.getgrgid(int(arg))
        elif what == "path":
            if not os.path.exists(arg):
                return "no such file on this host (the rule matches nothing here)"
            if not os.access(arg, os.X_OK) or os.path.isdir(arg):
                return "not an executable file"
    except KeyError:
        noun = {"user": "user", "group": "group", "uid": "user with this uid",
                "gid": "group with this gid"}[what]
        return f"no {noun} on this host (the rule matches nothing here)"
    return None


def check_policy(path: Path) -> Report:
    """Every error (file:line) and every selector this host cannot satisfy."""
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        return Report(source, [Finding(None, f"cannot read policy: {exc.strerror}")], [])
    except UnicodeDecodeError:
        return Report(source, [Finding(None, "policy is not UTF-8 text")], [])
    try:  # once: a 10,000-rule file takes ~1 s to parse (issue 22)
        doc: dict[str, Any] | None = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = None
    errors, policy = _errors(text, source, doc)
    warnings = [Finding(None, w) for w in getattr(policy, "warnings", ())]
    warnings += _selector_warnings(text, doc) if doc is not None else []
    report = Report(source, errors, warnings)
    if policy is not None and not errors:
        report.agents, report.bundles = len(policy.agents), len(policy.bundles)
        report.policy, report.text = policy, text
    return report
