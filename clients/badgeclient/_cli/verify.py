"""``badgectl verify``: check a badged credential offline, as a relying party would.

Uses :mod:`badgeclient.verify` only (no daemon): trust comes from files the
operator gives -- a JWKS (``badgectl jwks``) or the org root certificate
(``badgectl ca init``), plus optionally the device CRL.

    badgectl verify --jwks jwks.json --audience https://api < token
    badgectl verify --kind assertion --jwks jwks.json --audience https://as/token ASSERTION
    badgectl verify --kind dpop --htm GET --htu https://api/x PROOF
    badgectl verify --root root.pem --crl crl.pem --device-chain chain.pem --kind attestation \\
        --pop POP --audience https://as ATTESTATION

An access token must carry the daemon's issuer (``--issuer``, or the
``badged_issuer`` member of the JWKS that ``badgectl jwks`` writes), its
access-token ``typ`` (an assertion is refused as a token), and the ``sub``
of the agent its key belongs to. ``--require-dpop`` refuses bearer tokens;
a ``--dpop`` proof with an unbound token is refused anyway.

``--status-list`` also checks an access token's ``status`` claim against
the daemon's Token Status List (docs/status-list.md): ``socket`` fetches it
from the daemon's workload socket (``--socket`` / ``BADGED_SOCKET``), a path
reads a file written by ``badgectl status-list export``. The list must be
signed by the device key: ``--status-keys`` (``badgectl trust-bundle
--jwks``, pinned out of band); with ``socket`` it defaults to the trust
bundle that same socket serves. A file's list must have been signed at most
``--status-max-age`` seconds ago (a file can be stale; the socket's list is
current: the daemon re-signs on every change). A revoked token, a token
without a status claim, or a list that cannot be fetched, verified or is too
old: refused.

    badgectl verify --jwks jwks.json -a https://api --status-list socket < token
    badgectl verify --jwks jwks.json -a https://api --status-list status.jwt \
        --status-keys device.jwks --status-max-age 300 < token

Exit codes: 0 verified (result as JSON on stdout), 1 refused (reason on
stderr), 2 usage.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from badgeclient._cli.options import EXIT_REFUSED, EXIT_USAGE, fail, json_option, socket_option
from badgeclient.status import StatusListChecker
from badgeclient.verify import DpopRequest, Revocations, VerificationError, Verifier, load_roots

_logger = logging.getLogger(__name__)

_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


def _read_credential(value: str) -> str:
    if value == "-":
        return sys.stdin.read().strip()
    return value.strip()


def _result(r: Any) -> dict[str, Any]:
    doc = {k: getattr(r, k) for k in ("agent", "user", "issuer", "audience", "scopes", "jti",
                                      "expires_at", "key_id", "dpop_jkt", "assurance")
           if hasattr(r, k)}
    if getattr(r, "chain", ()):
        doc["chain"] = [c.subject.rfc4514_string() for c in r.chain]
    att = getattr(r, "attestation", None)
    if att is not None:
        doc["attestation"] = {"attester": att.attester, "key_thumbprint": att.key_thumbprint,
                              "profile": att.profile, "hwkey": dict(att.hwkey),
                              "workload": dict(att.workload)}
    return doc


@click.command("verify")
@click.argument("credential", default="-")
@click.option("--kind", type=click.Choice(["token", "assertion", "attestation", "dpop"]),
              default="token", show_default=True)
@click.option("--audience", "-a", default=None, help="Expected aud (required except for dpop).")
@click.option("--issuer", default=None,
              help="Expected iss (tokens); default: badged_issuer from --jwks.")
@click.option("--client-id", default=None, help="Expected client id (assertions).")
@click.option("--jwks", type=_FILE, default=None, help="Trusted JWK Set (JSON).")
@click.option("--root", type=_FILE, default=None, help="Trusted root certificate(s), PEM.")
@click.option("--crl", type=_FILE, default=None, help="Agent CRL from the device (PEM).")
@click.option("--device-chain", type=_FILE, default=None, help="Device chain that signed --crl.")
@click.option("--pop", default=None, help="Client attestation PoP (kind attestation).")
@click.option("--challenge", default=None)
@click.option("--dpop", "dpop_proof", default=None, help="DPoP proof presented with the token.")
@click.option("--htm", default=None)
@click.option("--htu", default=None)
@click.option("--nonce", default=None)
@click.option("--require-dpop", is_flag=True,
              help="Tokens: refuse a token that is not DPoP-bound (cnf.jkt).")
@click.option("--skew", type=click.IntRange(0, 300), default=30, show_default=True)
@click.option("--min-assurance", type=click.Choice(["foundation", "enterprise", "advanced"]),
              default=None, help="Refuse tokens whose agent assurance level is lower "
                                 "(docs/credentials.md \"Assurance levels\").")
@click.option("--status-list", "status_source", default=None, metavar="socket|FILE",
              help="Tokens: check the status claim against the daemon's status list, from "
                   "its socket or a file from 'badgectl status-list export'.")
@click.option("--status-keys", type=_FILE, default=None,
              help="Device JWKS that signs status lists ('badgectl trust-bundle --jwks'); "
                   "default with --status-list socket: that socket's trust bundle.")
@click.option("--status-max-age", type=click.FloatRange(1, 24 * 3600), default=300,
              show_default=True,
              help="Refuse a status list file signed longer ago than this many seconds.")
@json_option
@socket_option
def verify_command(credential: str, kind: str, audience: str | None, issuer: str | None,
                   client_id: str | None, jwks: Path | None, root: Path | None, crl: Path | None,
                   device_chain: Path | None, pop: str | None, challenge: str | None,
                   dpop_proof: str | None, htm: str | None, htu: str | None, nonce: str | None,
                   require_dpop: bool, skew: int, min_assurance: str | None,
                   status_source: str | None, status_keys: Path | None, status_max_age: float,
                   as_json: bool, socket_path: str | None) -> None:
    """Verify CREDENTIAL (or stdin) and print the typed result as JSON."""
    now = time.time()
    if status_source is not None and kind != "token":
        raise click.UsageError("--status-list applies to --kind token")
    if min_assurance is not None and kind != "token":
        raise click.UsageError("--min-assurance applies to --kind token")
    if kind != "dpop" and audience is None:
        raise click.UsageError("--audience is required")
    if (kind == "dpop" or dpop_proof) and not (htm and htu):
        raise click.UsageError("DPoP checks need --htm and --htu")
    roots = load_roots(root.read_bytes()) if root else []
    revocations = None
    if crl is not None:
        if device_chain is None:
            raise click.UsageError("--crl needs --device-chain (the CRL's issuer)")
        issuer_cert = load_roots(device_chain.read_bytes())[0]
        try:
            revocations = Revocations.from_crl(crl.read_bytes(), issuer_cert, now=now)
        except VerificationError as exc:
            fail(EXIT_REFUSED, "refused", f"refused: {exc.reason}", as_json=as_json)
    status = None
    if status_source is not None:
        status = _status_checker(status_source, status_keys, status_max_age, skew,
                                 socket_path, as_json)
    verifier = Verifier(jwks=json.loads(jwks.read_text()) if jwks else None, roots=roots,
                        skew=skew, revocations=revocations, min_assurance=min_assurance,
                        status=status)
    cred = _read_credential(credential)
    try:
        result: Any
        if kind == "token":
            req = DpopRequest(dpop_proof, htm or "", htu or "", nonce) if dpop_proof else None
            result = verifier.verify_token(cred, audience=audience or "", issuer=issuer, dpop=req,
                                           require_dpop=require_dpop)
        elif kind == "assertion":
            result = verifier.verify_client_assertion(cred, audience=audience or "",
                                                      client_id=client_id)
        elif kind == "attestation":
            if pop is None:
                raise click.UsageError("--pop is required for attestations")
            result = verifier.verify_client_attestation(cred, pop, audience=audience or "",
                                                        challenge=challenge)
        else:
            d = verifier.verify_dpop(cred, htm=htm or "", htu=htu or "", nonce=nonce)
            result = None
            click.echo(json.dumps({"jkt": d.jkt, "htm": d.htm, "htu": d.htu, "jti": d.jti,
                                   "iat": d.iat}, indent=2, sort_keys=True))
    except VerificationError as exc:
        fail(EXIT_REFUSED, "refused", f"refused: {exc}", as_json=as_json)
    if result is not None:
        click.echo(json.dumps(_result(result), indent=2, sort_keys=True, default=list))


def _status_checker(source: str, keys_file: Path | None, max_age: float, skew: int,
                    socket_path: str | None, as_json: bool) -> StatusListChecker:
    """The Token Status List check: from the daemon's socket or an exported file.

    One verification, so ``max_age`` of the in-memory cache does not matter;
    what bounds staleness is where the list comes from: fetched from the
    socket now, or a file whose ``iat`` must be within ``max_age``.
    """
    from badgeclient.status import file_fetcher, socket_fetcher

    keys: dict[str, Any]
    if source == "socket":
        fetch = socket_fetcher(socket_path or _default_socket())
        if keys_file is None:
            from badgeclient.credentials import CredentialClient

            try:
                with CredentialClient(socket_path) as c:
                    keys = {"keys": [c.trust_bundle().device_jwk]}
            except Exception as exc:  # any transport failure: refuse
                fail(EXIT_REFUSED, "refused",
                     f"refused: status_unavailable (no trust bundle: {type(exc).__name__})",
                     as_json=as_json)
        iat_age = None
    else:
        path = Path(source)
        if keys_file is None:
            fail(EXIT_USAGE, "usage", "--status-list FILE needs --status-keys (the device JWKS)",
                 as_json=as_json)
        if not path.is_file():
            fail(EXIT_USAGE, "usage", f"--status-list: no such file {source!r} "
                 "(or 'socket' for the daemon's)", as_json=as_json)
        fetch = file_fetcher(path)
        iat_age = max_age
    if keys_file is not None:
        try:
            keys = json.loads(keys_file.read_text())
        except ValueError:
            fail(EXIT_USAGE, "usage", "--status-keys is not JSON", as_json=as_json)
    try:
        return StatusListChecker(fetch=fetch, keys=keys, max_age=max_age, skew=skew,
                                 max_iat_age=iat_age)
    except ValueError as exc:
        fail(EXIT_USAGE, "usage", f"--status-keys: {exc}", as_json=as_json)


def _default_socket() -> str:
    from badgeclient.client import DEFAULT_SOCKET

    return str(DEFAULT_SOCKET)
