"""A relying party's check of a badged token, with joserfc (not badged code).

    python clients/examples/verify_token.py token.json jwks.json [audience]

token.json is `badgectl token --json` output, jwks.json is `badgectl jwks`.
Prints the verified claims; exits 1 if the signature, audience or expiry fail,
or if it is not an access token of the agent whose key signed it. The last
three checks are what a stock JOSE library does not do by itself, and what
keeps one agent's key from speaking for another (docs/credentials.md): the
``typ`` is an access token's (an assertion signed by the same key is
``client-authentication+jwt``), ``iss`` is the daemon's (``badged_issuer``
in the JWKS), and ``sub`` -- ``act.sub`` when delegated -- is the agent the
signing key belongs to (its JWKS entry's ``badged_agent``).
"""

from __future__ import annotations

import json
import sys
import time

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet


def main() -> int:
    with open(sys.argv[1]) as fh:
        token = json.load(fh)["token"]
    with open(sys.argv[2]) as fh:
        doc = json.load(fh)
    jwks = KeySet.import_key_set(doc)
    agents = {k["kid"]: k.get("badged_agent") for k in doc["keys"]}
    audience = sys.argv[3] if len(sys.argv) > 3 else None
    try:
        decoded = jwt.decode(token, jwks, algorithms=["ES256"])
        registry = jwt.JWTClaimsRegistry(
            now=int(time.time()), leeway=30,
            exp={"essential": True}, iat={"essential": True}, jti={"essential": True},
            aud={"essential": True, **({"value": audience} if audience else {})},
        )
        registry.validate(decoded.claims)
    except JoseError as exc:
        print(f"token REJECTED: {exc.error}: {exc.description}", file=sys.stderr)
        return 1
    claims, header = decoded.claims, decoded.header
    act = claims.get("act")
    subject = act.get("sub") if isinstance(act, dict) else claims.get("sub")
    for ok, why in (
        (header.get("typ") in ("JWT", "at+jwt"), "not an access token (typ)"),
        (claims.get("iss") == doc.get("badged_issuer"), "not the daemon's issuer"),
        (subject is not None and agents.get(header.get("kid")) == subject,
         "sub names another agent than the key that signed it"),
    ):
        if not ok:
            print(f"token REJECTED: {why}", file=sys.stderr)
            return 1
    print(f"token verified with joserfc against the JWKS (kid {decoded.header['kid']}):")
    print(json.dumps(decoded.claims, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
