"""The src/ layout: a folder named like the package in the working directory (a clone run from the
folder above it) must not shadow the installed package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_clone_folder_in_cwd_does_not_shadow_the_package(tmp_path):
    (tmp_path / "hypernetworks").symlink_to(REPO, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "from hypernetworks import HyperLSTM; print(HyperLSTM.__module__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hypernetworks.nn.hyper_lstm"
    assert not (REPO / "hypernetworks" / "__init__.py").exists()
