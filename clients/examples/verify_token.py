"""A relying party's check of a badged token, with joserfc (not badged code).

    python clients/examples/verify_token.py token.json jwks.json [audience]

token.json is `badgectl token --json` output, jwks.json is `badgectl jwks`.
Prints the verified claims; exits 1 if the signature, audience or expiry fail.
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
        jwks = KeySet.import_key_set(json.load(fh))
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
    print(f"token verified with joserfc against the JWKS (kid {decoded.header['kid']}):")
    print(json.dumps(decoded.claims, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
