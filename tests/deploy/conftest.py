"""A dedicated system user and the documented layout, shared by the deploy tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.deploy.layout import Layout, SystemUser, build_layout, make_user, require_root


@pytest.fixture(scope="module")
def svc_user() -> Iterator[SystemUser]:
    require_root()
    yield from make_user(f"badged-t{os.getpid() % 100000}")


@pytest.fixture
def layout(svc_user: SystemUser) -> Iterator[Layout]:
    yield from build_layout(svc_user)
