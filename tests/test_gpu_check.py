"""benchmarks/gpu_check.py end to end on CPU (--device cpu --quick): its three JSON records."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run as on a GPU image with torch and Lightning only: the project's other dependencies are not found.
RUNNER = """
import runpy, sys

class Absent:
    BLOCKED = ("jsonargparse", "fastapi", "uvicorn", "starlette", "docstring_parser")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_quick_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-c", RUNNER, "--device", "cpu", "--quick", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = {}
    for path in sorted(tmp_path.glob("*.json")):
        rec = json.loads(path.read_text())
        records[rec["part"]] = rec
    assert set(records) == {"correctness", "speed", "ptb"}
    for rec in records.values():
        assert rec["passed"] is True and rec["quick"] is True and rec["device"] == "cpu"
        assert rec["command"].startswith("python benchmarks/gpu_check.py --device cpu --quick")
        assert rec["torch"] and rec["date"].endswith("Z") and rec["machine"]["cpu_count"] >= 1

    checks = records["correctness"]["values"]["checks"]
    names = " ".join(c["check"] for c in checks)
    for what in ("LN HyperLSTM", "LN LSTM", "bidirectional", "packed", "two layers", "recurrent dropout",
                 "autocast bfloat16", "cuda_graphed", "float64 CPU eager"):
        assert what in names, what
    assert all(c["passed"] and c["finite"] for c in checks)
    assert any("CUDA tensor" in s for s in records["correctness"]["values"]["skipped"])  # graphs: CUDA only

    tables = records["speed"]["values"]["tables"]
    assert set(tables) == {"batch 4", "batch 8"}
    for t in tables.values():
        assert set(t["rows"]) == {"torch.nn.LSTM", "HyperLSTM", "LN HyperLSTM", "LN LSTM"}
        assert all(r["seconds"] > 0 for r in t["rows"].values())
        assert t["rows"]["torch.nn.LSTM"]["x_torch_lstm"] == 1.0

    v = records["ptb"]["values"]
    assert v["recipe"] == "configs/ptb-ln-hyperlstm.yaml" and v["model"]["cell"] == "ln-hyperlstm"
    assert v["steps"] == 12 and v["epochs_done"] > 0 and v["seconds_per_step_median"] > 0
    assert math.isfinite(v["val_bpc_final"]) and 0 < v["val_bpc_final"] < 10
    assert "stand-in" in v["note"]
