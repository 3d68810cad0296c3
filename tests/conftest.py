"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real UCF101/HMDB51 split files live in shared/ beside the checkout (also in CI).
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.fail(f"{path}: the shared split files are missing (expected beside the checkout)")
    return path
