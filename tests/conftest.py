"""Shared test fixtures. Real datasets are read from ../shared/data (beside the checkout);
tests that need one are skipped with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HYPERNETWORKS_DATA", REPO.parent / "shared" / "data"))

# The test models are tiny: intra-op threads only add synchronisation (measured up to 20x
# slower with 2 threads on a busy 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the folder is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set HYPERNETWORKS_DATA)")
    return SHARED_DATA


def require_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"dataset file not found: {path}")
    return path
