"""badgebench: badged against its peers, on one SoftHSM P-256 key, in one run.

Entry point: ``bash bench/run [--quick]`` (see docs/performance.md).
"""

__all__: list[str] = []
