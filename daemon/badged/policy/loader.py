"""Read a policy TOML file into :class:`~badged.policy.model.Policy`.

Every problem is reported as ``file:line: reason`` (ConfigError), so an
operator can fix it without guessing; a running daemon keeps its last good
policy when a reload fails. The format is documented, with every key, in
docs/policy.example.toml. In short::

    [baseline]                      # every agent
    audiences = ["https://status.example.com"]
    kinds = ["token"]
    max_ttl = "5m"

    [bundle.deploy]                 # reusable access bundle
    audiences = ["https://deploy.example.com"]
    scopes = ["deploy:read", "deploy:write"]
    kinds = ["token", "sign"]
    max_ttl = "10m"
    rate = "30/1m"
    approval = false

    [[agent]]
    name = "deploy-bot"
    selectors = ["unix:user:deploy", "unix:sha256:<hex>"]
    bundles = ["deploy"]

    [delegation]
    allow = ["unix:group:staff"]    # who may delegate to agents

``[[bind]]`` (agent + inline bundle in one table) is kept as a shorthand.

Refused because they would not mean what they say (issue 13):

* a rule binding by executable, unit, container, cgroup or ancestry with no
  uid/user/gid/group selector -- any local user could be that agent --
  unless the rule sets ``allow_any_user = true`` (loaded with a warning);
* an agent whose bundles (with the baseline) allow ``sign`` or ``csr`` under
  different gates (approval, rate): those kinds carry no audience or scope,
  so the author cannot have meant both (the strictest would decide anyway,
  see badged.policy.model).
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Any

from badged.errors import ConfigError
from badged.identity.registry import check_agent_name
from badged.policy.model import (
    BINDING_SELECTORS,
    KINDS,
    UNSCOPED_KINDS,
    USER_SELECTORS,
    AgentRule,
    Bundle,
    Policy,
    ProxyAllow,
    Rate,
    Route,
    parse_selector,
)
from badged.proxy.paths import check_method, check_pattern

_logger = logging.getLogger(__name__)

MAX_TTL_CAP = 24 * 3600
_DURATION_RE = re.compile(r"^(\d+)(s|m|h)?$")
_RATE_RE = re.compile(r"^(\d+)\s*/\s*(\d*)(s|m|h)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_BUNDLE_KEYS = {"audiences", "scopes", "kinds", "max_ttl", "rate", "approval", "description",
                "ssh_namespaces", "ssh_hosts", "ssh_users", "ssh_principals", "proxy",
                "context"}
_ROUTE_KEYS = {"upstream", "credential", "audience", "scopes", "secret", "header", "prefix",
               "ca_file", "max_request_bytes", "rate", "timeout", "description",
               "token_endpoint", "client_id"}
_CREDENTIALS = ("bearer", "dpop", "secret", "oauth")
_HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Headers a route may not carry its secret in: the proxy owns them.
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "dpop",
                     "te", "upgrade", "trailer", "keep-alive", "proxy-authorization",
                     "cookie"}
_PROXY_ALLOW_KEYS = {"route", "methods", "paths"}
_RULE_FLAGS = ("allow_any_user", "other_mount_ns")
_AGENT_KEYS = {"name", "selectors", "bundles", "description", "client_ids", *_RULE_FLAGS}
_BIND_KEYS = ((_BUNDLE_KEYS | {"agent", "selectors", "client_ids", *_RULE_FLAGS})
              - {"rate", "approval"})
_CLIENT_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
_AGENT_ID_RE = re.compile(r"^spiffe://[^/]+/agent/([^/]+)$")
_TOP_KEYS = {"baseline", "bundle", "agent", "bind", "delegation", "approval", "route"}


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


def parse_rate(value: Any) -> Rate:
    """``"30/1m"``, ``"100/60s"``, ``"5/h"`` → Rate(count, window seconds)."""
    if not isinstance(value, str) or not (m := _RATE_RE.match(value.strip())):
        raise ValueError(f"rate {value!r} is not like \"30/1m\", \"100/60s\" or \"5/1h\"")
    count = int(m.group(1))
    window = int(m.group(2) or 1) * {"s": 1, "m": 60, "h": 3600}[m.group(3)]
    if count <= 0 or window <= 0:
        raise ValueError("rate count and window must be positive")
    if count > 1_000_000 or window > 7 * 86400:
        raise ValueError("rate is out of range (count <= 1e6, window <= 7d)")
    return Rate(count, window)


class _Lines:
    """Finds where a table or key is written, for file:line errors."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # pattern -> its header lines: one scan per pattern, not one per rule
        # (10,000 [[agent]] rules made loading quadratic: minutes; issue 22).
        self._hits: dict[str, list[int]] = {}

    def header(self, pattern: str, nth: int = 0) -> int:
        hits = self._hits.get(pattern)
        if hits is None:
            rx = re.compile(rf"^\s*{pattern}\s*(#.*)?$")
            hits = self._hits[pattern] = [i for i, line in enumerate(self.lines)
                                          if rx.match(line)]
        return hits[nth] if nth < len(hits) else 0

    def key(self, start: int, key: str) -> int:
        rx = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for i in range(start, len(self.lines)):
            if i > start and self.lines[i].lstrip().startswith("["):
                break
            if rx.match(self.lines[i]):
                return i + 1
        return start + 1


def _strings(entry: dict[str, Any], key: str, *, required: bool) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a list of non-empty strings")
    if required and not value:
        raise ValueError(f"{key} must not be empty")
    return value


def _bundle_context(value: Any) -> tuple[tuple[str, frozenset[str]], ...]:
    """``context = { channel = ["#deploy"] }``: the request context a bundle is limited to."""
    from badged.core.context import KEYS, parse
    from badged.errors import InvalidRequestError

    if not isinstance(value, dict):
        raise ValueError("context must be a table like { channel = [\"#deploy\"] }")
    out: list[tuple[str, frozenset[str]]] = []
    for k in sorted(value):
        if k not in KEYS:
            raise ValueError(f"context: unknown key {k!r} (known: {', '.join(KEYS)})")
        vals = _strings(value, k, required=True)
        try:
            for v in vals:
                parse([(k, v)])
        except InvalidRequestError as exc:
            raise ValueError(exc.caller_message) from None
        out.append((k, frozenset(vals)))
    return tuple(out)


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.where = _Lines(text)
        self.short = Path(source).name
        self.warnings: list[str] = []
        self.routes: dict[str, Route] = {}

    def fail(self, line: int, msg: str) -> ConfigError:
        return ConfigError(msg, path=self.source, line=line)

    def bundle(self, name: str, entry: Any, start: int, *, allowed: set[str]) -> Bundle:
        if not isinstance(entry, dict):
            raise self.fail(start + 1, f"bundle {name!r} must be a table")
        key = "?"
        try:
            unknown = sorted(set(entry) - allowed)
            if unknown:
                key = unknown[0]
                raise ValueError(f"unknown key {key!r} (known: {', '.join(sorted(allowed))})")
            key = "kinds"
            kinds = _strings(entry, "kinds", required=False) or ["token"]
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"unknown kinds {bad} (known: {', '.join(KINDS)})")
            key = "audiences"
            audiences = _strings(entry, "audiences", required=False)
            needs_aud = sorted(set(kinds) & {"token", "assertion", "dpop"})
            if needs_aud and not audiences:
                raise ValueError(f"bundle names nothing: kinds {needs_aud} need audiences")
            key = "scopes"
            scopes = _strings(entry, "scopes", required=False)
            for s in scopes:
                if " " in s:
                    raise ValueError(f"scope {s!r} contains a space")
            key = "max_ttl"
            max_ttl = parse_duration(entry.get("max_ttl", 300), what="max_ttl")
            key = "rate"
            rate = parse_rate(entry["rate"]) if "rate" in entry else None
            key = "approval"
            approval = entry.get("approval", False)
            if not isinstance(approval, bool):
                raise ValueError("approval must be true or false")
            ssh: dict[str, frozenset[str]] = {}
            for key in ("ssh_namespaces", "ssh_hosts", "ssh_users", "ssh_principals"):
                ssh[key] = frozenset(_strings(entry, key, required=False))
                if ssh[key] and "ssh" not in kinds:
                    raise ValueError(f"{key} needs kind 'ssh' in kinds")
            key = "ssh_hosts"
            for host in ssh["ssh_hosts"]:
                if not host.startswith("SHA256:"):
                    raise ValueError(f"ssh_hosts: {host!r} is not a SHA256:... host key "
                                     "fingerprint (ssh-keygen -lf)")
            key = "ssh_principals"
            for principal in ssh["ssh_principals"]:
                if not 0 < len(principal) <= 256 or "," in principal or any(
                        ord(c) < 0x21 or ord(c) == 0x7f for c in principal):
                    raise ValueError(f"ssh_principals: {principal[:40]!r} is not a principal "
                                     "(1-256 printable characters, no comma or space)")
            key = "proxy"
            proxy = self.proxy_allows(entry.get("proxy", []))
            if proxy and "proxy" not in kinds:
                raise ValueError("proxy entries need kind 'proxy' in kinds")
            if "proxy" in kinds and not proxy:
                raise ValueError("kind 'proxy' needs [[bundle.NAME.proxy]] entries "
                                 "(route, methods, paths)")
            key = "context"
            context = _bundle_context(entry.get("context", {}))
        except ValueError as exc:
            raise self.fail(self.where.key(start, key), f"bundle {name!r}: {exc}") from None
        return Bundle(name=name, audiences=frozenset(audiences), scopes=frozenset(scopes),
                      context=context, kinds=frozenset(kinds), max_ttl=max_ttl, rate=rate,
                      approval=approval,
                      ssh_namespaces=ssh["ssh_namespaces"], ssh_hosts=ssh["ssh_hosts"],
                      ssh_users=ssh["ssh_users"], ssh_principals=ssh["ssh_principals"],
                      proxy=proxy,
                      source=f"{self.short}:{start + 1}")

    def proxy_allows(self, value: Any) -> tuple[ProxyAllow, ...]:
        """``[[bundle.NAME.proxy]]``: route = "x", methods = [...], paths = [...]."""
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError("proxy must be an array of tables ([[bundle.NAME.proxy]])")
        out = []
        for entry in value:
            unknown = sorted(set(entry) - _PROXY_ALLOW_KEYS)
            if unknown:
                raise ValueError(f"proxy entry: unknown key {unknown[0]!r} "
                                 f"(known: {', '.join(sorted(_PROXY_ALLOW_KEYS))})")
            route = entry.get("route")
            if not isinstance(route, str) or route not in self.routes:
                raise ValueError(f"proxy entry: route {route!r} is not a [route.NAME]")
            methods = frozenset(check_method(m) for m in _strings(entry, "methods",
                                                                  required=True))
            paths = tuple(check_pattern(p) for p in _strings(entry, "paths", required=True))
            out.append(ProxyAllow(route=route, methods=methods, paths=paths))
        return tuple(out)

    def route(self, name: str, entry: Any, start: int) -> Route:
        """``[route.NAME]``: an upstream and how its credential is attached."""
        from urllib.parse import urlsplit

        if not isinstance(entry, dict):
            raise self.fail(start + 1, f"route {name!r} must be a table")
        key = "?"
        try:
            unknown = sorted(set(entry) - _ROUTE_KEYS)
            if unknown:
                key = unknown[0]
                raise ValueError(f"unknown key {key!r} (known: {', '.join(sorted(_ROUTE_KEYS))})")
            key = "upstream"
            upstream = entry.get("upstream")
            if not isinstance(upstream, str):
                raise ValueError("upstream is required: an https:// URL")
            parts = urlsplit(upstream)
            if parts.scheme != "https":
                raise ValueError("upstream must be https:// (the proxy never downgrades)")
            if not parts.hostname or parts.username is not None or parts.password is not None \
                    or parts.query or parts.fragment or not upstream.isascii():
                raise ValueError("upstream needs a host and no userinfo, query or fragment")
            _ = parts.port  # ValueError on a bad port
            key = "credential"
            credential = entry.get("credential")
            if credential not in _CREDENTIALS:
                raise ValueError(f"credential must be one of {', '.join(_CREDENTIALS)}")
            origin = f"https://{parts.netloc.lower()}"
            key = "audience"
            audience = entry.get("audience", origin if credential != "secret" else "")
            if not isinstance(audience, str):
                raise ValueError("audience must be a string")
            key = "scopes"
            scopes = _strings(entry, "scopes", required=False)
            key = "secret"
            secret = entry.get("secret", "")
            if credential == "secret":
                if not isinstance(secret, str) or not _NAME_RE.match(secret):
                    raise ValueError("credential 'secret' needs secret = NAME ([a-z0-9._-])")
            elif secret:
                raise ValueError("secret is only for credential = 'secret'")
            key = "token_endpoint"
            token_endpoint = entry.get("token_endpoint", "")
            client_id = entry.get("client_id", "")
            if credential == "oauth":
                tparts = urlsplit(token_endpoint) if isinstance(token_endpoint, str) else None
                if tparts is None or tparts.scheme != "https" or not tparts.hostname \
                        or tparts.username is not None or tparts.fragment:
                    raise ValueError("credential 'oauth' needs token_endpoint = an https:// URL")
                key = "client_id"
                if not isinstance(client_id, str) or (client_id and not _CLIENT_ID_RE.match(
                        client_id)):
                    raise ValueError("client_id must be 1-256 printable ASCII characters")
            elif token_endpoint or client_id:
                raise ValueError("token_endpoint and client_id are only for credential = 'oauth'")
            key = "header"
            header = entry.get("header", "Authorization")
            if not isinstance(header, str) or not _HEADER_RE.match(header) \
                    or header.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {header!r} is not a header a secret may go in")
            key = "prefix"
            prefix = entry.get("prefix", "")
            if not isinstance(prefix, str) or not prefix.isprintable() or len(prefix) > 64:
                raise ValueError("prefix must be a short printable string like \"Bearer \"")
            key = "ca_file"
            ca_file = entry.get("ca_file")
            if ca_file is not None and (not isinstance(ca_file, str)
                                        or not ca_file.startswith("/")):
                raise ValueError("ca_file must be an absolute path")
            key = "max_request_bytes"
            limit = entry.get("max_request_bytes", 1 << 20)
            if not isinstance(limit, int) or isinstance(limit, bool) \
                    or not 0 <= limit <= 1 << 30:
                raise ValueError("max_request_bytes must be an integer 0..1073741824")
            key = "rate"
            rate = parse_rate(entry["rate"]) if "rate" in entry else None
            key = "timeout"
            timeout = parse_duration(entry.get("timeout", 30), what="timeout")
        except ValueError as exc:
            raise self.fail(self.where.key(start, key), f"route {name!r}: {exc}") from None
        return Route(name=name, upstream=upstream.rstrip("/"), credential=credential,
                     audience=audience, scopes=tuple(scopes), secret=secret, header=header,
                     prefix=prefix, ca_file=ca_file, max_request_bytes=limit, rate=rate,
                     timeout=timeout, token_endpoint=token_endpoint, client_id=client_id,
                     source=f"{self.short}:{start + 1}")

    def selectors(self, entry: dict[str, Any], start: int, what: str) -> frozenset[str]:
        try:
            sels = _strings(entry, "selectors", required=True)
            for sel in sels:
                parse_selector(sel)
        except ValueError as exc:
            raise self.fail(self.where.key(start, "selectors"), f"{what}: {exc}") from None
        return frozenset(sels)

    def flag(self, entry: dict[str, Any], key: str, start: int, what: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(self.where.key(start, key), f"{what}: {key} must be true or false")
        return value

    def rule(self, entry: dict[str, Any], name: str, sels: frozenset[str],
             bundle_names: tuple[str, ...], start: int, what: str,
             client_ids: frozenset[str] = frozenset()) -> AgentRule:
        """An agent rule, refused when it binds by what runs but not by who runs it."""
        any_user = self.flag(entry, "allow_any_user", start, what)
        other_ns = self.flag(entry, "other_mount_ns", start, what)
        types = {parse_selector(sel)[0] for sel in sels}
        binding = sorted(types & BINDING_SELECTORS)
        if binding and not types & USER_SELECTORS:
            message = (f"{what} ({name}): binds by {', '.join(binding)} without a unix:uid, "
                       f"unix:user, unix:gid or unix:group selector, so any local user who "
                       f"runs that binary (or names a cgroup so) would be this agent")
            if not any_user:
                raise self.fail(self.where.key(start, "selectors"),
                                f"{message}; add a user selector, or set "
                                f"allow_any_user = true if that is really meant")
            line = self.where.key(start, "allow_any_user")
            self.warnings.append(f"{self.short}:{line}: {message} (allow_any_user = true)")
        if other_ns and "unix:path" not in types:
            raise self.fail(self.where.key(start, "other_mount_ns"),
                            f"{what} ({name}): other_mount_ns applies to unix:path selectors, "
                            f"and this rule has none")
        return AgentRule(agent=name, selectors=sels, bundles=bundle_names,
                         source=f"{self.short}:{start + 1}", allow_any_user=any_user,
                         other_mount_ns=other_ns, client_ids=client_ids)

    def check_gates(self, rule: AgentRule, baseline: Bundle | None,
                    bundles: dict[str, Bundle], start: int, what: str) -> None:
        """``sign``/``csr`` allowed under two different gates is refused as ambiguous."""
        applicable = ([baseline] if baseline is not None else []) + [
            bundles[b] for b in rule.bundles]
        for kind in UNSCOPED_KINDS:
            allowing = [b for b in applicable if kind in b.kinds]
            gates = {(b.approval, b.rate) for b in allowing}
            if len(gates) > 1:
                desc = ", ".join(
                    f"{b.name} ({'approval' if b.approval else 'no approval'}, "
                    f"{'rate ' + str(b.rate) if b.rate else 'no rate'})" for b in allowing)
                raise self.fail(
                    self.where.key(start, "bundles"),
                    f"{what} ({rule.agent}): kind {kind!r} is allowed by bundles with "
                    f"different approval/rate: {desc}. {kind} requests carry no audience or "
                    f"scope, so every one of them matches all these bundles; allow {kind} "
                    f"in one of them only, or give them the same approval and rate")

    def client_ids(self, entry: dict[str, Any], start: int, what: str, agent: str,
                   earlier: list[AgentRule]) -> frozenset[str]:
        """Optional ``client_ids``: extra OAuth client ids this agent may name.

        An id is the operator's statement "this OAuth client is that agent", so
        it may not be another agent's SPIFFE ID, and one id may not belong to
        two agents (either could then authenticate as the other's client).
        """
        try:
            ids = _strings(entry, "client_ids", required=False)
            for cid in ids:
                if not _CLIENT_ID_RE.match(cid):
                    raise ValueError(f"client id {cid[:40]!r}: 1-256 printable ASCII chars")
                m = _AGENT_ID_RE.match(cid)
                if cid.startswith("spiffe://") and (m is None or m.group(1) != agent):
                    raise ValueError(f"client id {cid!r}: a SPIFFE ID may only be the "
                                     f"agent's own (spiffe://TD/agent/{agent})")
                for rule in earlier:
                    if rule.agent != agent and cid in rule.client_ids:
                        raise ValueError(f"client id {cid!r} already belongs to agent "
                                         f"{rule.agent!r} ({rule.source})")
        except ValueError as exc:
            raise self.fail(self.where.key(start, "client_ids"),
                            f"{what} ({agent}): {exc}") from None
        return frozenset(ids)

    def agent_name(self, entry: dict[str, Any], key: str, start: int, what: str) -> str:
        name = entry.get(key)
        try:
            if not isinstance(name, str):
                raise ValueError(f"{key} is required and must be a string")
            check_agent_name(name)
        except Exception as exc:
            detail = getattr(exc, "public", None) or str(exc)
            raise self.fail(self.where.key(start, key), f"{what}: {detail}") from None
        return name

    def parse(self, doc: dict[str, Any]) -> Policy:
        for key in doc:
            if key not in _TOP_KEYS:
                line = self.where.header(rf"\[+\s*{re.escape(key)}[\].]") or 0
                raise self.fail(line + 1 if line else self.where.key(0, key),
                                f"unknown top-level table {key!r} "
                                f"(known: {', '.join(sorted(_TOP_KEYS))})")
        raw_routes = doc.get("route", {})
        if not isinstance(raw_routes, dict):
            raise self.fail(1, "route must be tables like [route.NAME]")
        for name, entry in raw_routes.items():
            start = self.where.header(rf"\[\s*route\.\"?{re.escape(name)}\"?\s*\]")
            if not _NAME_RE.match(name):
                raise self.fail(start + 1, f"route name {name!r}: use [a-z0-9._-], max 63")
            self.routes[name] = self.route(name, entry, start)
        baseline = None
        if "baseline" in doc:
            start = self.where.header(r"\[\s*baseline\s*\]")
            baseline = self.bundle("baseline", doc["baseline"], start, allowed=_BUNDLE_KEYS)
        bundles: dict[str, Bundle] = {}
        raw_bundles = doc.get("bundle", {})
        if not isinstance(raw_bundles, dict):
            raise self.fail(1, "bundle must be tables like [bundle.NAME]")
        for name, entry in raw_bundles.items():
            start = self.where.header(rf"\[\s*bundle\.\"?{re.escape(name)}\"?\s*\]")
            if not _NAME_RE.match(name):
                raise self.fail(start + 1, f"bundle name {name!r}: use [a-z0-9._-], max 63")
            bundles[name] = self.bundle(name, entry, start, allowed=_BUNDLE_KEYS)
        rules: list[AgentRule] = []
        first_with: dict[frozenset[str], AgentRule] = {}  # selectors -> first rule with them
        for idx, entry in enumerate(self._array(doc, "agent")):
            start = self.where.header(r"\[\[\s*agent\s*\]\]", idx)
            what = f"[[agent]] #{idx + 1}"
            unknown = sorted(set(entry) - _AGENT_KEYS)
            if unknown:
                raise self.fail(self.where.key(start, unknown[0]),
                                f"{what}: unknown key {unknown[0]!r}")
            name = self.agent_name(entry, "name", start, what)
            sels = self.selectors(entry, start, f"{what} ({name})")
            try:
                names = _strings(entry, "bundles", required=False)
            except ValueError as exc:
                raise self.fail(self.where.key(start, "bundles"), f"{what}: {exc}") from None
            if len(set(names)) != len(names):
                raise self.fail(self.where.key(start, "bundles"),
                                f"{what} ({name}): a bundle is listed twice")
            for b in names:
                if b not in bundles:
                    raise self.fail(self.where.key(start, "bundles"),
                                    f"{what} ({name}): unknown bundle {b!r}")
            if not names and baseline is None:
                raise self.fail(self.where.key(start, "bundles"),
                                f"{what} ({name}): grants nothing (no bundles and no baseline)")
            # A dict, not a scan of the earlier rules: 10,000 rules took 13 s (issue 22).
            earlier = first_with.get(sels)
            if earlier is not None and earlier.agent != name:
                raise self.fail(self.where.key(start, "selectors"),
                                f"{what} ({name}): same selectors as {earlier.agent!r} at "
                                f"{earlier.source}; every such caller would be ambiguous")
            rule = self.rule(entry, name, sels, tuple(names), start, what,
                             self.client_ids(entry, start, what, name, rules))
            self.check_gates(rule, baseline, bundles, start, what)
            rules.append(rule)
            first_with.setdefault(sels, rule)
        for idx, entry in enumerate(self._array(doc, "bind")):
            start = self.where.header(r"\[\[\s*bind\s*\]\]", idx)
            what = f"[[bind]] #{idx + 1}"
            unknown = sorted(set(entry) - _BIND_KEYS)
            if unknown:
                raise self.fail(self.where.key(start, unknown[0]),
                                f"{what}: unknown key {unknown[0]!r}")
            name = self.agent_name(entry, "agent", start, what)
            sels = self.selectors(entry, start, f"{what} ({name})")
            inline = {k: v for k, v in entry.items()
                      if k not in ("agent", "selectors", "client_ids", *_RULE_FLAGS)}
            bundle_name = f"bind.{name}.{start + 1}"
            bundles[bundle_name] = self.bundle(bundle_name, inline, start, allowed=_BUNDLE_KEYS)
            rule = self.rule(entry, name, sels, (bundle_name,), start, what,
                             self.client_ids(entry, start, what, name, rules))
            self.check_gates(rule, baseline, bundles, start, what)
            rules.append(rule)
        delegators: frozenset[str] = frozenset()
        dsource = ""
        agents_may_delegate = False
        if "delegation" in doc:
            start = self.where.header(r"\[\s*delegation\s*\]")
            entry = doc["delegation"]
            if not isinstance(entry, dict) or set(entry) - {"allow", "agents_may_delegate"}:
                raise self.fail(start + 1, "[delegation] takes only allow = [selectors] and "
                                           "agents_may_delegate = true|false")
            try:
                allow = _strings(entry, "allow", required=True)
                for sel in allow:
                    parse_selector(sel)
            except ValueError as exc:
                raise self.fail(self.where.key(start, "allow"), f"[delegation]: {exc}") from None
            delegators = frozenset(allow)
            dsource = f"{self.short}:{start + 1}"
            agents_may_delegate = self.flag(entry, "agents_may_delegate", start, "[delegation]")
        requester_may_approve = False
        if "approval" in doc:
            start = self.where.header(r"\[\s*approval\s*\]")
            entry = doc["approval"]
            if not isinstance(entry, dict) or set(entry) - {"requester_may_approve"}:
                raise self.fail(start + 1,
                                "[approval] takes only requester_may_approve = true|false")
            requester_may_approve = self.flag(entry, "requester_may_approve", start, "[approval]")
        for warning in self.warnings:
            _logger.warning("policy loaded with a warning", extra={"warning": warning})
        return Policy(agents=tuple(rules), bundles=bundles, baseline=baseline,
                      delegators=delegators, delegators_source=dsource, source=self.source,
                      agents_may_delegate=agents_may_delegate,
                      requester_may_approve=requester_may_approve,
                      warnings=tuple(self.warnings), routes=self.routes)

    def _array(self, doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(self.where.header(rf"\[+\s*{key}\s*\]+") + 1,
                            f"{key!r} must be an array of tables ([[{key}]])")
        return value


def parse_policy(text: str, source: str, *, doc: dict[str, Any] | None = None) -> Policy:
    """``doc``: ``text`` already parsed by ``tomllib`` (the start-up check parses
    a 10,000-rule file once for everything it does; issue 22). Not modified."""
    if doc is None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            raise ConfigError(f"TOML syntax: {exc}", path=source,
                              line=int(m.group(1)) if m else None) from None
    return _Parser(text, source).parse(doc)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy: {exc.strerror}", path=str(path)) from None
    return parse_policy(text, str(path))
