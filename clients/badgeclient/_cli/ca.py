"""``badgectl ca init|challenge|sign|revoke|crl``: a small operator CA for labs and tests.

Its key is generated in a SoftHSM token of its own under ``--dir``; it
checks each enrollment request's CSR signature and key evidence before
signing. Offline: it never talks to a daemon. Production uses the
organization's CA with the same request files.

A TPM device is enrolled in two rounds (credential activation ties its AK
to the EK certificate, see docs/credentials.md)::

    badgectl ca challenge req.json --dir CA --ek-ca ek-ca.pem -o chal.json
    # on the device: badgectl enroll activate chal.json -o resp.json
    badgectl ca sign req.json --dir CA --ek-ca ek-ca.pem --response resp.json \\
        --agent build-bot -o chain.pem

or online, when the CA runs where it can reach the daemon's admin socket
(the same documents over the enrollment RPC)::

    badgectl ca enroll --dir CA --ek-ca ek-ca.pem --agent build-bot

Exit codes: 0 ok, 1 request refused (reason printed), 2 usage. ``--json``: results
and errors as JSON on stdout.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click

from badgeclient._cli.options import EXIT_REFUSED, EXIT_USAGE, emit_json, fail, json_option

_logger = logging.getLogger(__name__)

dir_option = click.option("--dir", "ca_dir", type=click.Path(path_type=Path, file_okay=False),
                          required=True, help="CA directory (its token, root.pem).")
ek_ca_option = click.option(
    "--ek-ca", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
    help="TPM manufacturer CA certificate(s), PEM: require TPM evidence whose EK certificate "
         "chains to one of them (and credential activation of its AK).")
trust_domain_option = click.option("--trust-domain", "trust_domains", multiple=True,
                                   help="Only accept these trust domains (repeatable; default any).")


def _json() -> bool:
    """Was --json given to the running command? (errors then print as JSON)"""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


@click.group("ca")
def ca_group() -> None:
    """Operator CA: create it, challenge and sign device enrollment requests, revoke."""


def _ek_ca_keys(ek_ca: Path | None) -> list[Any] | None:
    from cryptography import x509

    if ek_ca is None:
        return None
    try:
        return [c.public_key() for c in x509.load_pem_x509_certificates(ek_ca.read_bytes())]
    except ValueError:
        fail(EXIT_USAGE, "usage", f"{ek_ca}: not PEM certificates", as_json=_json())


def _open(ca_dir: Path) -> Any:
    from badged.enroll.ca import OperatorCA
    from badged.errors import BadgedError

    try:
        return OperatorCA.open(ca_dir)
    except BadgedError as exc:
        fail(EXIT_USAGE, "usage", str(exc), as_json=_json())


@ca_group.command("init")
@dir_option
@click.option("--name", default="badged lab root", show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@json_option
def ca_init(ca_dir: Path, name: str, days: int, as_json: bool) -> None:
    """Create the CA: key in a new token, self-signed root in DIR/root.pem."""
    from badged.enroll.ca import OperatorCA
    from badged.errors import BadgedError

    try:
        ca = OperatorCA.init(ca_dir, name=name, days=days, now=time.time())
    except BadgedError as exc:
        fail(EXIT_USAGE, "usage", str(exc), as_json=_json())
    ca.close()
    if as_json:
        emit_json({"root": str(ca_dir / "root.pem"), "dir": str(ca_dir)})
        return
    click.echo(str(ca_dir / "root.pem"))


@ca_group.command("challenge")
@click.argument("request", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@dir_option
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Challenge to carry to the device (badgectl enroll activate).")
@ek_ca_option
@trust_domain_option
@json_option
def ca_challenge(request: Path, ca_dir: Path, out: Path, ek_ca: Path | None,
                 trust_domains: tuple[str, ...], as_json: bool) -> None:
    """Verify a TPM REQUEST and challenge its AK (TPM2_MakeCredential to the EK)."""
    from badged.enroll.ca import RequestRejected

    ek_ca_keys = _ek_ca_keys(ek_ca)
    ca = _open(ca_dir)
    try:
        doc = ca.challenge(request.read_bytes(), now=time.time(),
                           trust_domains=frozenset(trust_domains), ek_ca_keys=ek_ca_keys)
    except RequestRejected as exc:
        fail(EXIT_REFUSED, "refused", f"refused: {exc.reason}: {exc}", as_json=_json())
    finally:
        ca.close()
    out.write_text(json.dumps(doc, indent=2))
    if as_json:
        emit_json({"challenge": str(out), "device_id": doc["device_id"]})
        return
    click.echo(f"{out}: challenge for device {doc['device_id']}; on the device run "
               f"badgectl enroll activate {out}")


@ca_group.command("sign")
@click.argument("request", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@dir_option
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Chain to give back to the device (device cert, then root).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True)
@trust_domain_option
@ek_ca_option
@click.option("--response", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="The device's answer to `badgectl ca challenge` (TPM devices).")
@click.option("--agent", "agents", multiple=True,
              help="An agent the device may vouch for (repeatable): its certificate's name "
                   "constraints permit exactly these.")
@click.option("--agents-from-request", is_flag=True,
              help="Permit the agents the request lists (printed; review them).")
@json_option
def ca_sign(request: Path, ca_dir: Path, out: Path, days: int, trust_domains: tuple[str, ...],
            ek_ca: Path | None, response: Path | None, agents: tuple[str, ...],
            agents_from_request: bool, as_json: bool) -> None:
    """Verify REQUEST (CSR signature, key evidence, activation, identity) and issue the chain."""
    from badged.core.x509 import to_pem
    from badged.enroll.ca import RequestRejected
    from badged.errors import InvalidRequestError

    raw = request.read_bytes()
    permitted = list(agents)
    if agents_from_request:
        try:
            listed = json.loads(raw).get("agents", [])
        except (ValueError, AttributeError):
            listed = []
        if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
            fail(EXIT_REFUSED, "refused", "the request's agent list is malformed", as_json=_json())
        permitted += listed
    if not permitted:
        fail(EXIT_USAGE, "usage", "name the agents this device may vouch for: --agent NAME "
             "(repeatable) or --agents-from-request", as_json=_json())
    ek_ca_keys = _ek_ca_keys(ek_ca)
    ca = _open(ca_dir)
    try:
        chain = ca.sign_request(raw, days=days, now=time.time(),
                                trust_domains=frozenset(trust_domains), ek_ca_keys=ek_ca_keys,
                                response=response.read_bytes() if response else None,
                                agents=sorted(set(permitted)))
    except RequestRejected as exc:
        fail(EXIT_REFUSED, "refused", f"refused: {exc.reason}: {exc}", as_json=_json())
    except InvalidRequestError as exc:
        fail(EXIT_REFUSED, "refused", f"refused: {exc}", as_json=_json())
    finally:
        ca.close()
    out.write_text("".join(to_pem(c) for c in chain))
    if as_json:
        emit_json({"chain": str(out), "subject": chain[0].subject.rfc4514_string(),
                   "serial": f"{chain[0].serial_number:x}",
                   "not_after": f"{chain[0].not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                   "agents": sorted(set(permitted))})
        return
    click.echo(f"{out}: device {chain[0].subject.rfc4514_string()} "
               f"serial {chain[0].serial_number:x} until {chain[0].not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
               f"; may vouch for: {', '.join(sorted(set(permitted)))}")


@ca_group.command("enroll")
@dir_option
@ek_ca_option
@trust_domain_option
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True)
@click.option("--agent", "agents", multiple=True, required=True,
              help="An agent the device may vouch for (repeatable).")
@click.option("--admin-socket", default=None, help="The daemon's admin socket.")
@json_option
def ca_enroll(ca_dir: Path, ek_ca: Path | None, trust_domains: tuple[str, ...], days: int,
              agents: tuple[str, ...], admin_socket: str | None, as_json: bool) -> None:
    """Online enrollment of a local daemon: request, (TPM) challenge and
    activation, signature and import, over the enrollment RPC (prints JSON)."""
    from badgeclient.credentials import EnrollmentClient
    from badged.core.x509 import to_pem
    from badged.enroll.ca import RequestRejected
    from badged.errors import InvalidRequestError

    ek_ca_keys = _ek_ca_keys(ek_ca)
    with EnrollmentClient(admin_socket) as client:
        request = client.request().encode()
        ca = _open(ca_dir)
        try:
            response = None
            if ek_ca_keys is not None:
                challenge = ca.challenge(request, now=time.time(),
                                         trust_domains=frozenset(trust_domains),
                                         ek_ca_keys=ek_ca_keys)
                response = client.activate(json.dumps(challenge)).encode()
            chain = ca.sign_request(request, days=days, now=time.time(),
                                    trust_domains=frozenset(trust_domains),
                                    ek_ca_keys=ek_ca_keys, response=response,
                                    agents=sorted(set(agents)))
        except RequestRejected as exc:
            fail(EXIT_REFUSED, "refused", f"refused: {exc.reason}: {exc}", as_json=_json())
        except InvalidRequestError as exc:
            fail(EXIT_REFUSED, "refused", f"refused: {exc}", as_json=_json())
        finally:
            ca.close()
        status = client.import_chain("".join(to_pem(c) for c in chain))
    emit_json({"device_id": status.device_id, "attestation": status.attestation,
               "permitted_agents": list(status.permitted_agents), "not_after": status.not_after})


@ca_group.command("revoke")
@dir_option
@click.option("--serial", default=None, help="Device certificate serial (hex).")
@click.option("--device", "device_id", default=None, help="Every certificate of this device id.")
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="The device certificate (PEM; the first one in the file).")
@json_option
def ca_revoke(ca_dir: Path, serial: str | None, device_id: str | None, cert: Path | None,
              as_json: bool) -> None:
    """Revoke a device certificate; its agents' certificates fall with it (publish `ca crl`)."""
    from cryptography import x509

    from badged.errors import NotFoundError

    number: int | None = None
    if cert is not None:
        number = x509.load_pem_x509_certificates(cert.read_bytes())[0].serial_number
    elif serial is not None:
        try:
            number = int(serial.replace(":", ""), 16)
        except ValueError:
            fail(EXIT_USAGE, "usage", "--serial must be hex", as_json=_json())
    if number is None and device_id is None:
        fail(EXIT_USAGE, "usage", "name --serial, --cert or --device", as_json=_json())
    ca = _open(ca_dir)
    try:
        revoked = ca.revoke(now=time.time(), serial=number, device_id=device_id)
    except NotFoundError as exc:
        fail(EXIT_REFUSED, "refused", str(exc), as_json=_json())
    finally:
        ca.close()
    if as_json:
        emit_json({"revoked": [f"{n:x}" for n in revoked]})
        return
    click.echo("revoked " + ", ".join(f"{s:x}" for s in revoked) + "; publish a new CRL "
               "(badgectl ca crl)")


@ca_group.command("crl")
@dir_option
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True)
@json_option
def ca_crl(ca_dir: Path, out: Path, as_json: bool) -> None:
    """Write the CA's CRL (revoked device certificates), PEM, valid for a week."""
    from badged.core.x509 import to_pem

    ca = _open(ca_dir)
    try:
        crl = ca.crl(now=time.time())
    finally:
        ca.close()
    out.write_text(to_pem(crl))
    if as_json:
        emit_json({"crl": str(out), "revoked": len(list(crl))})
        return
    click.echo(f"{out}: {len(list(crl))} revoked device certificate(s)")
