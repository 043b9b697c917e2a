"""OpenSSH agent protocol over the agents\x27 hardware keys (issue 19)."""
