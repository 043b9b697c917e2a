"""A relying party's check of a session-mode token: joserfc, then the chain.

    python clients/examples/verify_session_chain.py token.json jwks.json [audience]

token.json is `badgectl token --json` output, jwks.json is `badgectl jwks`.
Step 1 is what any JOSE library does against the JWKS; step 2 ties the key
that signed the token to the agent's hardware key (docs/tpm.md, "The chain
check"). Here the hardware key comes from the same JWKS; pin it (e.g. from a
TPM2_Certify attestation) by passing ``hardware_keys``. Exits 1 on refusal.
"""

from __future__ import annotations

import json
import sys
import time

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from badgeclient.session_verify import SessionChainError, verify_session_chain


def main() -> int:
    with open(sys.argv[1]) as fh:
        token = json.load(fh)["token"]
    with open(sys.argv[2]) as fh:
        jwks = json.load(fh)
    audience = sys.argv[3] if len(sys.argv) > 3 else None
    try:
        decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
        jwt.JWTClaimsRegistry(
            now=int(time.time()), leeway=30, exp={"essential": True}, jti={"essential": True},
            aud={"essential": True, **({"value": audience} if audience else {})},
        ).validate(decoded.claims)
        chain = verify_session_chain(token, jwks, now=time.time())
    except JoseError as exc:
        print(f"token REJECTED by joserfc: {exc.error}: {exc.description}", file=sys.stderr)
        return 1
    except SessionChainError as exc:
        print(f"token REJECTED by the chain check: {exc.reason}", file=sys.stderr)
        return 1
    print(f"token verified: joserfc against the JWKS (kid {chain.session_kid}),")
    print(f"signed by a session key certified by hardware key {chain.hardware_kid}")
    print(f"for {chain.agent}, usable until {chain.use_until}, certification expires "
          f"{chain.cert_expires_at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
