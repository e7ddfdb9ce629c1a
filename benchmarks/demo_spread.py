"""How much ``hypernetworks demo``'s figures move between runs and between machines.

The demo fixes its seed, its data order and one torch thread, so two runs on one machine print the
same figures. Another machine can still print slightly different ones: the floating-point
operations are the same but their rounding is not, because the code that runs depends on the CPU
(ATen's AVX2/AVX-512 kernels, MKL's instruction path, the fused kernels built with -march=native or,
without a C++ compiler, not built at all); 1,000 optimiser steps amplify those last-bit differences.
This script reruns the demo on one machine under environment settings that select each of those
code paths, which is what a different CPU or setup would do, and prints the figures side by side:

    OMP_NUM_THREADS=1 python benchmarks/demo_spread.py                 # the full demo, ~2 min per variant idle
    OMP_NUM_THREADS=1 python benchmarks/demo_spread.py --steps 200     # quicker
    OMP_NUM_THREADS=1 python benchmarks/demo_spread.py --variants "this machine" "this machine, again" --record

``--record`` writes ``results/tables/demo.json`` (the demo's table from the first variant, with its
training times) and ``results/tables/demo-spread.json`` (every variant's figures and wall time);
``benchmarks/report.py`` rebuilds the pages' demo tables from them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> environment added to the demo's (what another machine would select by itself)
VARIANTS: dict[str, dict[str, str]] = {
    "this machine": {},
    "this machine, again": {},
    "AVX2 CPU (ATen + MKL on AVX2)": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no C++ compiler (fused kernels off)": {"HYPERNETWORKS_KERNELS": "0"},
}


def code_fingerprint() -> str:
    """Hash of the package's source (Python and C++): runs compare only when this is equal."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1] / "src" / "hypernetworks"
    for f in sorted([*pkg.rglob("*.py"), *pkg.rglob("*.cpp")]):
        h.update(f.relative_to(pkg).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:10]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="demo steps per model (default: the demo's 1000)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS (default: all)")
    p.add_argument("--record", action="store_true",
                   help="write results/tables/demo.json and demo-spread.json (records for the pages' tables)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import conditions, write_record

    started = conditions(torch_threads=1)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants):
            env = {**os.environ, "OMP_NUM_THREADS": "1", **VARIANTS[name]}
            run_dir = Path(tmp) / f"v{i}"
            code, t0 = code_fingerprint(), time.perf_counter()
            subprocess.run([sys.executable, "-m", "hypernetworks.cli", "demo", "--steps", str(args.steps),
                            "--run-dir", str(run_dir), "--no-progress"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            results = json.loads((run_dir / "results.json").read_text())
            first = first or results
            res = {r["cell"]: r["val_bpc"] for r in results}
            if code_fingerprint() != code:
                code += " (source changed during the run)"
            rows.append((name, res["hyperlstm"], res["lstm"], time.perf_counter() - t0, code))
            print(f"{name}: hyperlstm {res['hyperlstm']:.6f}  lstm {res['lstm']:.6f}  code {code}",
                  file=sys.stderr, flush=True)
    print(f"| variant ({args.steps} steps) | HyperLSTM valid bpc | LSTM valid bpc | wall s | source |")
    print("|---|---:|---:|---:|---|")
    for name, h, l, s, code in rows:
        print(f"| {name} | {h:.6f} | {l:.6f} | {s:.0f} | {code} |")
    hs, ls = [r[1] for r in rows], [r[2] for r in rows]
    print(f"| spread (max - min) | {max(hs) - min(hs):.6f} | {max(ls) - min(ls):.6f} | | |")
    if args.record:
        out = Path(__file__).resolve().parents[1] / "results" / "tables"
        label = {"hyperlstm": "HyperLSTM 128 (hyper 32, N_z 4)", "lstm": "LSTM 128"}
        write_record(out / "demo.json", name="demo", title=f"hypernetworks demo, {args.steps} steps, seed 0",
                     columns=["model", "params", "valid bpc", "train time"],
                     rows=[[label.get(r["cell"], r["cell"]), f"{r['params']:,}", f"{r['val_bpc']:.3f}",
                            f"{r['seconds']:.0f} s"] for r in first],
                     values={"results": first, "variant": args.variants[0]}, started=started)
        write_record(out / "demo-spread.json", name="demo-spread",
                     title=f"hypernetworks demo ({args.steps} steps) under the code paths of other machines",
                     columns=["variant", "HyperLSTM valid bpc", "LSTM valid bpc", "wall (s)", "source"],
                     rows=[[n, f"{h:.6f}", f"{l:.6f}", f"{w:.0f}", c] for n, h, l, w, c in rows] +
                          [["spread (max - min)", f"{max(hs) - min(hs):.6f}", f"{max(ls) - min(ls):.6f}", "", ""]],
                     values={"variants": [dict(zip(("variant", "hyperlstm", "lstm", "wall_s", "source"), r))
                                          for r in rows]}, started=started)
        print(f"wrote {out / 'demo.json'} and {out / 'demo-spread.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
