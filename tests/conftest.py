"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data():
    """The project's real corpora: $RMT_SHARED_DATA, else ../shared/data next to the repository.

    Tests on real data skip only on a developer machine without that directory; when $CI is set (or
    $RMT_SHARED_DATA names a missing directory) a missing directory is a failure, not a skip.
    """
    env = os.environ.get("RMT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if path.is_dir():
        return path
    if env:
        pytest.fail(f"RMT_SHARED_DATA={env} is not a directory")
    if os.environ.get("CI"):
        pytest.fail(f"real corpora missing at {path} and CI is set: CI must test on real data")
    pytest.skip(f"real corpora not found at {path} (set RMT_SHARED_DATA to run these tests)")
