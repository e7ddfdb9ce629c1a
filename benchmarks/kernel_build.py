"""First-use build cost of the fused step kernels against a torch C++ extension.

Builds, each into a fresh temporary cache, (a) this package's step kernels
(src/hypernetworks/nn/_kernels: plain C++ behind a C ABI, loaded with ctypes) and (b) a one-function
``torch.utils.cpp_extension.load_inline`` extension (what a torch-header kernel would cost at the
least), and reports the compilers' CPU time (children's user + system time, which does not depend on
how busy the machine is) and the wall time.

    python benchmarks/kernel_build.py
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(fn) -> tuple[float, float]:
    c0, t0 = children_cpu(), time.perf_counter()
    fn()
    return children_cpu() - c0, time.perf_counter() - t0


def build_ours() -> None:
    from hypernetworks.nn import _kernels
    with tempfile.TemporaryDirectory() as d:
        os.environ["HYPERNETWORKS_CACHE"] = d
        cxx = _kernels._compiler()
        if cxx is None:
            raise SystemExit("no C++ compiler found")
        _kernels._build(cxx)


def build_torch_extension() -> None:
    from torch.utils.cpp_extension import load_inline
    with tempfile.TemporaryDirectory() as d:
        load_inline("hn_build_probe", cpp_sources="torch::Tensor twice(torch::Tensor x) { return x * 2; }",
                    functions=["twice"], build_directory=d, verbose=False)


def main() -> int:
    import torch
    rows = [("hypernetworks step kernels (C ABI, ctypes)", build_ours),
            ("torch.utils.cpp_extension.load_inline, one function", build_torch_extension)]
    load = os.getloadavg()[0]
    print(f"first-use build, torch {torch.__version__}, load average {load:.1f}\n")
    print("| build | compiler CPU time (s) | wall time (s) |")
    print("|---|---:|---:|")
    for name, fn in rows:
        cpu, wall = measure(fn)
        print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
