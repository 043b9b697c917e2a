"""``badgectl ca init|sign``: a small operator CA for labs and tests.

Its key is generated in a SoftHSM token of its own under ``--dir``; it
checks each enrollment request's CSR signature and key evidence before
signing. Offline: it never talks to a daemon. Production uses the
organization's CA with the same request files.

Exit codes: 0 ok, 1 request refused (reason printed), 2 usage.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

_logger = logging.getLogger(__name__)

dir_option = click.option("--dir", "ca_dir", type=click.Path(path_type=Path, file_okay=False),
                          required=True, help="CA directory (its token, root.pem).")


@click.group("ca")
def ca_group() -> None:
    """Operator CA: create it, sign device enrollment requests."""


@ca_group.command("init")
@dir_option
@click.option("--name", default="badged lab root", show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
def ca_init(ca_dir: Path, name: str, days: int) -> None:
    """Create the CA: key in a new token, self-signed root in DIR/root.pem."""
    from badged.enroll.ca import OperatorCA
    from badged.errors import BadgedError

    try:
        ca = OperatorCA.init(ca_dir, name=name, days=days, now=time.time())
    except BadgedError as exc:
        click.echo(f"badgectl: {exc}", err=True)
        sys.exit(2)
    ca.close()
    click.echo(str(ca_dir / "root.pem"))


@ca_group.command("sign")
@click.argument("request", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@dir_option
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Chain to give back to the device (device cert, then root).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True)
@click.option("--trust-domain", "trust_domains", multiple=True,
              help="Only sign for these trust domains (repeatable; default any).")
@click.option("--ek-ca", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="TPM manufacturer CA certificate(s), PEM: require TPM evidence "
                                 "whose EK certificate chains to one of them.")
def ca_sign(request: Path, ca_dir: Path, out: Path, days: int,
            trust_domains: tuple[str, ...], ek_ca: Path | None) -> None:
    """Verify REQUEST (CSR signature, key evidence, identity) and issue the device chain."""
    from cryptography import x509

    from badged.core.x509 import to_pem
    from badged.enroll.ca import OperatorCA, RequestRejected
    from badged.errors import BadgedError

    ek_ca_keys = None
    if ek_ca is not None:
        ek_ca_keys = [c.public_key() for c in x509.load_pem_x509_certificates(ek_ca.read_bytes())]
    try:
        ca = OperatorCA.open(ca_dir)
    except BadgedError as exc:
        click.echo(f"badgectl: {exc}", err=True)
        sys.exit(2)
    try:
        chain = ca.sign_request(request.read_bytes(), days=days, now=time.time(),
                                trust_domains=frozenset(trust_domains), ek_ca_keys=ek_ca_keys)
    except RequestRejected as exc:
        click.echo(f"badgectl: refused: {exc.reason}", err=True)
        sys.exit(1)
    finally:
        ca.close()
    out.write_text("".join(to_pem(c) for c in chain))
    click.echo(f"{out}: device {chain[0].subject.rfc4514_string()} "
               f"serial {chain[0].serial_number:x} until {chain[0].not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
