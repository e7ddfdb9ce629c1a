"""Shared test fixtures. Tests that need a real dataset read it from the data folder, as users do
(``hypernetworks.data.root``): ``$HYPERNETWORKS_DATA`` when set, else a ``shared/data`` folder beside
the checkout when there is one (the CI machine's layout), else the per-user data folder. Run them with

    HYPERNETWORKS_DATA=/path/to/data .venv/bin/python -m pytest -q

Without the files such a test is skipped with a reason that names the missing path; tests never
download."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The tests read the real datasets through the same data folder mechanism as users
# (hypernetworks.data.root). When $HYPERNETWORKS_DATA is unset it is set here: to a shared/data
# folder beside the checkout if that exists, else to the per-user data folder.
if not os.environ.get("HYPERNETWORKS_DATA"):
    _beside = REPO.parent / "shared" / "data"
    if _beside.is_dir():
        os.environ["HYPERNETWORKS_DATA"] = str(_beside)
    else:
        from hypernetworks.data.root import data_root

        os.environ["HYPERNETWORKS_DATA"] = str(data_root())
SHARED_DATA = Path(os.environ["HYPERNETWORKS_DATA"])

# The test models are tiny: intra-op threads only add synchronisation (measured up to 20x
# slower with 2 threads on a busy 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(params=["loops", "kernels", "torch-ops"])
def step_path(request, monkeypatch):
    """The fused layers on their three CPU paths: the whole-sequence loops of the compiled library
    (with torch's BLAS), the Python step loop over the compiled kernels (no BLAS found, as on torch
    builds without MKL), and the PyTorch-op implementation (what CUDA without Triton and machines
    without a compiler run)."""
    from hypernetworks.nn import _kernels

    if request.param in ("loops", "kernels"):
        if _kernels.library() is None:
            pytest.skip(f"the compiled step kernels are not available here ({_kernels._state.get('why')}); "
                        "the PyTorch-op variant of this test still runs")
        if request.param == "loops" and _kernels.sequence_loops() is None:
            pytest.skip("this torch links no MKL, so the compiled sequence loops are off; the step-loop "
                        "variant of this test still runs")
        if request.param == "kernels":
            monkeypatch.setitem(_kernels._state, "loops", False)
    else:
        monkeypatch.setattr(_kernels, "_state", {"lib": None, "why": "test: PyTorch-op path"})
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder; skips the test when the folder is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real datasets, and there is no data folder at {SHARED_DATA}; run with "
                    "HYPERNETWORKS_DATA=/path/to/data (README, Testing)")
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
        pytest.skip(f"needs the dataset file {path}, which is not in the data folder; point "
                    "HYPERNETWORKS_DATA at a folder that has it (README, Testing)")
    return path
