"""Device enrollment, the agent-certificate authority of an enrolled device,
and a small operator CA for labs and tests (``badgectl ca``)."""
