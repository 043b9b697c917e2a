"""badgectl commands for least-agency policy: step-ups, approvals, delegation,
and policy check/explain/reload."""

from __future__ import annotations

import datetime as dt
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from badgeclient._cli.credentials import context_option, parse_context
from badgeclient._cli.options import (
    EXIT_REFUSED,
    EXIT_USAGE,
    about,
    admin_socket_option,
    emit_json,
    json_option,
    socket_option,
)
from badgeclient.client import AdminClient, ApprovalInfo, DelegationInfo, GrantInfo, WorkloadClient

_DURATION = re.compile(r"^(\d+)(s|m|h|d)?$")


def parse_for(value: str) -> int:
    m = _DURATION.match(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 30m, 2h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


def _ts(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if epoch else "-"


_out = emit_json


def _grant_line(g: GrantInfo) -> str:
    where = (" in " + ",".join(f"{k}={v}" for k, v in sorted(g.context.items()))
             if g.context else "")
    return (f"{g.id}  {g.state:<8} {g.agent} +{g.bundle}{where} until {_ts(g.expires_at)} "
            f"by {g.granted_by}: {g.reason}")


def _delegation_line(d: DelegationInfo) -> str:
    state = "revoked" if d.revoked else "active"
    return (f"{d.id}  {state:<8} {d.user} -> {d.agent} scopes={','.join(d.scopes)} "
            f"audiences={','.join(d.audiences) or '*'} until {_ts(d.expires_at)}")


def _approval_block(a: ApprovalInfo) -> str:
    lines = [
        f"{a.id}  {a.state}  agent={a.agent} bundle={a.bundle} kind={a.kind}",
        f"  audience={a.audience or '-'} scopes={','.join(a.scopes) or '-'} ttl={a.ttl_seconds or 'default'}",
        *([f"  signs: {a.detail}"] if a.detail else []),
        f"  reason: {a.reason or '(none given)'}",
        *(["  context (asserted by the agent, not verified): "
           + ",".join(f"{k}={v}" for k, v in sorted(a.context.items()))] if a.context else []),
        *([f"  txn: {a.txn}"] if a.txn else []),
        f"  process: pid={a.pid} uid={a.uid} exe={a.exe or '?'}",
        f"  sha256: {a.exe_sha256 or '?'}",
        f"  parents: {' <- '.join(a.process_chain) or '-'}",
        f"  requested {_ts(a.requested_at)}, decide before {_ts(a.deadline)}"
        + (f", decided by {a.decided_by}" if a.decided_by else ""),
    ]
    return "\n".join(lines)


# -- step-ups -------------------------------------------------------------------------


@click.command("grant")
@click.argument("agent")
@click.argument("bundle")
@click.option("--for", "duration", required=True, help="How long, e.g. 30m, 2h.")
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
@context_option
@json_option
@admin_socket_option
def grant_command(agent: str, bundle: str, duration: str, reason: str, context: tuple[str, ...],
                  as_json: bool, admin_socket: str | None) -> None:
    """Step-up: add BUNDLE to AGENT for a bounded time (with --context: only in that context)."""
    about(f"grant of bundle {bundle!r} to agent {agent!r}")
    with AdminClient(admin_socket) as a:
        g = a.grant_bundle(agent, bundle, duration_seconds=parse_for(duration), reason=reason,
                           context=parse_context(context))
    _out(asdict(g)) if as_json else click.echo(_grant_line(g))


@click.group("grants")
def grants_group() -> None:
    """List and revoke step-up grants."""


@grants_group.command("list")
@click.option("--all", "include_inactive", is_flag=True, help="Include expired and revoked.")
@json_option
@admin_socket_option
def grants_list(include_inactive: bool, as_json: bool, admin_socket: str | None) -> None:
    with AdminClient(admin_socket) as a:
        grants = a.list_grants(include_inactive)
    if as_json:
        _out([asdict(g) for g in grants])
        return
    for g in grants:
        click.echo(_grant_line(g))
    if not grants:
        click.echo("no step-up grants")


@grants_group.command("revoke")
@click.argument("grant_id")
@json_option
@admin_socket_option
def grants_revoke(grant_id: str, as_json: bool, admin_socket: str | None) -> None:
    """End a step-up early."""
    about(f"grant {grant_id!r}")
    with AdminClient(admin_socket) as a:
        g = a.revoke_grant(grant_id)
    _out(asdict(g)) if as_json else click.echo(_grant_line(g))


# -- approvals --------------------------------------------------------------------------


@click.command("approvals")
@json_option
@admin_socket_option
def approvals_command(as_json: bool, admin_socket: str | None) -> None:
    """Requests waiting for (or recently given) a human decision."""
    with AdminClient(admin_socket) as a:
        items = a.list_approvals()
    if as_json:
        _out([asdict(x) for x in items])
        return
    for x in items:
        click.echo(_approval_block(x))
    if not items:
        click.echo("no approvals")


def _decide(approve: bool) -> Any:
    @click.argument("approval_id")
    @click.option("--comment", default="")
    @json_option
    @admin_socket_option
    def cmd(approval_id: str, comment: str, as_json: bool, admin_socket: str | None) -> None:
        about(f"approval {approval_id!r}")
        with AdminClient(admin_socket) as a:
            item = a.decide_approval(approval_id, approve=approve, comment=comment)
        if as_json:
            _out(asdict(item))
            return
        click.echo(f"{item.id} {item.state} by {item.decided_by}")

    return cmd


approve_command = click.command("approve", help="Approve a pending request.")(_decide(True))
deny_command = click.command("deny", help="Deny a pending request.")(_decide(False))


# -- delegation -------------------------------------------------------------------------


@click.command("delegate")
@click.argument("agent")
@click.option("--scope", "-s", "scopes", multiple=True, required=True)
@click.option("--audience", "-a", "audiences", multiple=True, help="Limit to these audiences.")
@click.option("--for", "duration", default="1h", show_default=True)
@click.option("--reason", default="")
@json_option
@socket_option
def delegate_command(agent: str, scopes: tuple[str, ...], audiences: tuple[str, ...],
                     duration: str, reason: str, as_json: bool, socket_path: str | None) -> None:
    """As yourself (attested by the kernel), let AGENT act for you for a bounded task.

    Give the printed id to the agent; its tokens then carry sub = you and
    act.sub = the agent, never more than both of you may do.
    """
    with WorkloadClient(socket_path) as w:
        d = w.delegate(agent=agent, scopes=scopes, audiences=audiences,
                       ttl_seconds=parse_for(duration), reason=reason)
    _out(asdict(d)) if as_json else click.echo(_delegation_line(d))


@click.group("delegations")
def delegations_group() -> None:
    """List and revoke delegations (operators; with --mine, your own, as yourself)."""


_mine_option = click.option(
    "--mine", is_flag=True,
    help="Your own delegations, over the workload socket as the attested user (no operator "
         "rights needed; refused to agent processes).")


@delegations_group.command("list")
@click.option("--all", "include_inactive", is_flag=True)
@_mine_option
@json_option
@socket_option
@admin_socket_option
def delegations_list(include_inactive: bool, mine: bool, as_json: bool, socket_path: str | None,
                     admin_socket: str | None) -> None:
    if mine:
        with WorkloadClient(socket_path) as w:
            items = w.my_delegations(include_inactive)
    else:
        with AdminClient(admin_socket) as a:
            items = a.list_delegations(include_inactive)
    if as_json:
        _out([asdict(d) for d in items])
        return
    for d in items:
        click.echo(_delegation_line(d))
    if not items:
        click.echo("no delegations")


@delegations_group.command("revoke")
@click.argument("delegation_id")
@_mine_option
@json_option
@socket_option
@admin_socket_option
def delegations_revoke(delegation_id: str, mine: bool, as_json: bool, socket_path: str | None,
                       admin_socket: str | None) -> None:
    about(f"delegation {delegation_id!r}")
    if mine:
        with WorkloadClient(socket_path) as w:
            d = w.revoke_my_delegation(delegation_id)
    else:
        with AdminClient(admin_socket) as a:
            d = a.revoke_delegation(delegation_id)
    _out(asdict(d)) if as_json else click.echo(_delegation_line(d))


# -- policy --------------------------------------------------------------------------


@click.group("policy")
def policy_group() -> None:
    """Check, explain and reload the policy."""


@policy_group.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def policy_check(path: Path, as_json: bool) -> None:
    """Validate a policy file offline: every error as FILE:LINE: reason, and a warning
    for each selector naming a user, group, uid or path this host does not have.

    Exit 0 when the daemon would accept the file (warnings allowed), 1 otherwise.
    """
    try:
        from badged.policy.check import check_policy  # the daemon's own loader decides
    except ImportError:  # pragma: no cover -- client-only install
        click.echo("badgectl: policy check needs the badged package installed", err=True)
        sys.exit(EXIT_USAGE)
    report = check_policy(path)
    if as_json:
        _out(report.as_dict())
        sys.exit(0 if report.ok else EXIT_REFUSED)

    def where(line: int | None) -> str:
        return f"{path}:{line}" if line else str(path)

    for e in report.errors:
        click.echo(f"{where(e.line)}: {e.message}", err=True)
    for w in report.warnings:
        click.echo(f"{where(w.line)}: warning: {w.message}", err=True)
    if not report.ok:
        click.echo(f"{path}: {len(report.errors)} error(s)", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo(f"{path}: OK ({report.agents} agent rules, {report.bundles} bundles"
               + (f", {len(report.warnings)} warning(s)" if report.warnings else "") + ")")


@policy_group.command("explain")
@click.option("--pid", type=int, required=True, help="The process to evaluate.")
@click.option("--audience", "-a", default="")
@click.option("--scope", "-s", "scopes", multiple=True)
@click.option("--kind", default="token", show_default=True)
@click.option("--agent", default=None)
@click.option("--ttl", type=int, default=0)
@click.option("--delegation", default=None)
@context_option
@json_option
@admin_socket_option
def policy_explain(pid: int, audience: str, scopes: tuple[str, ...], kind: str, agent: str | None,
                   ttl: int, delegation: str | None, context: tuple[str, ...], as_json: bool,
                   admin_socket: str | None) -> None:
    """Which rule would allow or deny this request from process PID, and why."""
    with AdminClient(admin_socket) as a:
        e = a.explain(pid=pid, audience=audience, scopes=scopes, kind=kind, agent=agent,
                      ttl_seconds=ttl, delegation=delegation, context=parse_context(context))
    if as_json:
        _out(asdict(e))
        return
    verdict = "ALLOW" if e.allowed else "DENY"
    click.echo(f"{verdict}  agent={e.agent or '-'} bundle={e.bundle or '-'} rule={e.rule}")
    click.echo(f"  reason: {e.reason}")
    if e.approval_required:
        click.echo("  needs human approval")
    for line in e.trace:
        click.echo(f"  - {line}")
    click.echo("  selectors: " + " ".join(e.selectors))


@policy_group.command("reload")
@json_option
@admin_socket_option
def policy_reload(as_json: bool, admin_socket: str | None) -> None:
    """Apply the policy file now; an invalid file is rejected and the old one stays."""
    about("policy reload")
    with AdminClient(admin_socket) as a:
        ok, error = a.reload_policy()
    if as_json:
        _out({"reloaded": ok, "error": error or None})
        sys.exit(0 if ok else EXIT_REFUSED)
    if not ok:
        click.echo(f"policy rejected, previous policy still in force:\n{error}", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo("policy reloaded")


COMMANDS = (grant_command, grants_group, approvals_command, approve_command, deny_command,
            delegate_command, delegations_group, policy_group)
