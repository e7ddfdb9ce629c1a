"""Shared test fixtures. Real datasets are read from ../shared/data (beside the checkout);
tests that need one are skipped with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The tests read the real datasets through the same data folder mechanism as users
# (hypernetworks.data.root): $HYPERNETWORKS_DATA, pointed at ../shared/data unless already set.
os.environ.setdefault("HYPERNETWORKS_DATA", str(REPO.parent / "shared" / "data"))
SHARED_DATA = Path(os.environ["HYPERNETWORKS_DATA"])

# The test models are tiny: intra-op threads only add synchronisation (measured up to 20x
# slower with 2 threads on a busy 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the folder is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set HYPERNETWORKS_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Data modules download by default where the owner publishes the data; tests never may."""
    import urllib.request
    from urllib.parse import urlsplit

    def guard(real):
        def call(url, *args, **kwargs):
            full = getattr(url, "full_url", url)
            parts = urlsplit(str(full))
            if parts.scheme != "file" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise RuntimeError(f"a test tried to download {full}")
            return real(url, *args, **kwargs)
        return call

    monkeypatch.setattr(urllib.request, "urlopen", guard(urllib.request.urlopen))
    monkeypatch.setattr(urllib.request, "urlretrieve", guard(urllib.request.urlretrieve))


def require_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"dataset file not found: {path}")
    return path
