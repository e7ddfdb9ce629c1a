"""Forward+backward time and peak training memory of the recurrent layers, as ratios to torch.nn.LSTM.

    python benchmarks/rnn_speed.py                  # the paper's PTB size on CPU
    python benchmarks/rnn_speed.py --device cuda    # same on a GPU, against cuDNN's LSTM
    python benchmarks/rnn_speed.py --quick          # smoke run at tiny size

Size (the paper's character-level PTB model): input 50, hidden 1000, hyper 128, N_z 4,
sequence 100, batch 64, one layer. Time is the median over ``--repeats`` rounds, the models
interleaved within each round so that load from other processes spreads evenly over them.
Peak memory is measured in a fresh subprocess per model: on CPU the growth of the peak
resident set (``VmHWM``, reset just before) during one forward+backward over the resident set then;
on CUDA ``torch.cuda.max_memory_allocated`` over the allocation just before it.

labml-nn 0.5.1's HyperLSTM (always layer-normalised, so compare it with "LN HyperLSTM") is
included when importable; install it outside the project with
``pip install --no-deps --target /tmp/labml labml-nn==0.5.1`` (``--labml-path`` to change).
It is never a dependency of this package.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1] / "src"  # the package, when run from a checkout without installing
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypernetworks.nn import LSTM, HyperLSTM, _kernels  # noqa: E402

MODELS = ("torch.nn.LSTM", "LSTM", "LN LSTM", "HyperLSTM", "LN HyperLSTM", "labml-nn HyperLSTM",
          "HyperLSTM (eager)", "LN HyperLSTM (eager)", "LN LSTM (torch ops)", "HyperLSTM (torch ops)",
          "LN HyperLSTM (torch ops)")
DEFAULT = MODELS[:6]
PACKED_DEFAULT = ("torch.nn.LSTM", "HyperLSTM", "HyperLSTM (torch ops)", "HyperLSTM (eager)", "LN HyperLSTM",
                  "LN HyperLSTM (eager)")
FULL = dict(input_size=50, hidden_size=1000, hyper_size=128, embedding_size=4, seq_len=100, batch=64)
QUICK = dict(input_size=8, hidden_size=64, hyper_size=16, embedding_size=4, seq_len=20, batch=8)


def labml_available(path: str) -> bool:
    if path and Path(path).is_dir() and path not in sys.path:
        sys.path.append(path)
    try:
        import labml_nn.hypernetworks.hyper_lstm  # noqa: F401
    except ImportError:
        return False
    return True


def build(name: str, size: dict) -> torch.nn.Module:
    if name.endswith(" (torch ops)"):  # the fused path with PyTorch ops: no C++ (CPU) or Triton (CUDA) step kernels
        m = build(name[: -len(" (torch ops)")], size)
        m.without_kernels = True
        return m
    if name.endswith(" (eager)"):  # the per-step reference path, for comparison
        m = build(name[: -len(" (eager)")], size)
        for cell in m.cells:
            cell.fused = False
        return m
    I, H = size["input_size"], size["hidden_size"]
    hyper = dict(hyper_size=size["hyper_size"], embedding_size=size["embedding_size"])
    if name == "torch.nn.LSTM":
        return torch.nn.LSTM(I, H)
    if name == "LSTM":
        return LSTM(I, H)
    if name == "LN LSTM":
        return LSTM(I, H, layer_norm=True)
    if name == "HyperLSTM":
        return HyperLSTM(I, H, **hyper)
    if name == "LN HyperLSTM":
        return HyperLSTM(I, H, layer_norm=True, **hyper)
    if name == "labml-nn HyperLSTM":
        from labml_nn.hypernetworks.hyper_lstm import HyperLSTM as LabmlHyperLSTM
        return LabmlHyperLSTM(I, H, size["hyper_size"], size["embedding_size"], 1)
    raise ValueError(f"unknown model {name!r}")


def make_input(size: dict, device: torch.device, packed: bool):
    """(T, B, I) noise, or with ``packed`` a PackedSequence of B sequences whose lengths are spread
    uniformly over [T/2, T] (one of length T), e.g. a bucketed batch of sentences."""
    torch.manual_seed(0)
    T, B = size["seq_len"], size["batch"]
    x = torch.randn(T, B, size["input_size"], device=device)
    if not packed:
        return x
    lengths = torch.randint(T // 2, T + 1, (B,))
    lengths[0] = T
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)


AUTOCAST: dict = {"dtype": None}  # --autocast: the forward under torch.autocast in this dtype


TRITON_ENV = "HYPERNETWORKS_TRITON"  # read per call by the CUDA path (hypernetworks/nn/_triton_kernels.py)


def step(model: torch.nn.Module, x) -> None:
    saved = dict(_kernels._state)
    saved_env = os.environ.get(TRITON_ENV)
    if getattr(model, "without_kernels", False):
        _kernels._state.update(lib=None, why="benchmark row without kernels")
        os.environ[TRITON_ENV] = "0"
    try:
        dtype = AUTOCAST["dtype"]
        device = (x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x).device.type
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out, _ = model(x)
        (out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out).float().sum().backward()
    finally:
        _kernels._state.clear()
        _kernels._state.update(saved)
        if saved_env is None:
            os.environ.pop(TRITON_ENV, None)
        else:
            os.environ[TRITON_ENV] = saved_env
    model.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_models(names, size, device, repeats: int, clock: str = "wall", packed: bool = False) -> dict[str, float]:
    x = make_input(size, device, packed)
    torch.manual_seed(0)
    models = {n: build(n, size).to(device) for n in names}
    for m in models.values():  # warm-up: allocator, oneDNN/cuDNN primitive caches
        step(m, x)
    times: dict[str, list[float]] = {n: [] for n in names}
    now = CLOCKS[clock]
    for _ in range(repeats):
        for n, m in models.items():
            sync(device)
            t0 = now()
            step(m, x)
            sync(device)
            times[n].append(now() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def compare_autocast(names, size, device, repeats: int, clock: str, dtype, record: str | None = None,
                     started=None) -> None:
    """Each model in float32 and under autocast, the two interleaved within each round."""
    x = make_input(size, device, False)
    torch.manual_seed(0)
    models = {n: build(n, size).to(device) for n in names}
    modes = {"float32": None, str(dtype).replace("torch.", ""): dtype}
    times = {(n, k): [] for n in names for k in modes}
    now = CLOCKS[clock]
    for r in range(repeats + 1):  # round 0 warms up
        for n, m in models.items():
            for k, d in modes.items():
                AUTOCAST["dtype"] = d
                sync(device)
                t0 = now()
                step(m, x)
                sync(device)
                if r:
                    times[(n, k)].append(now() - t0)
    AUTOCAST["dtype"] = None
    med = {key: statistics.median(v) for key, v in times.items()}
    low = list(modes)[1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"fwd+bwd, {', '.join(f'{k}={v}' for k, v in size.items())}; {where}; torch {torch.__version__}; "
          f"median of {repeats} interleaved rounds; {clock} clock{load}\n")
    b32, blow = med[(names[0], "float32")], med[(names[0], low)]
    rows = [[n, f"{med[(n, 'float32')]:.3f}", f"{med[(n, 'float32')] / b32:.2f}x", f"{med[(n, low)]:.3f}",
             f"{med[(n, low)] / blow:.2f}x", f"{med[(n, low)] / med[(n, 'float32')]:.2f}"] for n in names]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import emit_table

    emit_table(["model", "float32 (s)", "ratio", f"{low} autocast (s)", "ratio", f"{low} / float32"], rows, record,
               title=f"fwd+bwd, {', '.join(f'{k}={v}' for k, v in size.items())}; {where}; float32 and {low} "
                     f"autocast; median of {repeats} interleaved rounds; {clock} clock",
               started=started, values={"seconds": {f"{n} {k}": v for (n, k), v in med.items()}, "size": size})


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    # ru_maxrss cannot be used: it survives fork/exec and would report the parent's peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def breakdown(names, size: dict, device: torch.device, repeats: int) -> None:
    """Where a forward + backward's CPU time goes, per model (process CPU time, so meaningful on a
    loaded machine with --threads 1), and what one per-step product achieves."""
    import resource

    x = make_input(size, device, False)
    models = {n: build(n, size).to(device) for n in names}
    rows: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    for r in range(repeats + 1):  # round 0 warms up (kernel build, prepared weights, allocator)
        for n, m in models.items():
            m.zero_grad(set_to_none=True)
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            loss = m(x)[0].sum()
            u1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            loss.backward()
            u2, t2 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            if r:
                rows[n].append((t1 - t0, t2 - t1, u2.ru_minflt - u0.ru_minflt, u2.ru_stime - u0.ru_stime))
    med = {n: [statistics.median(col) for col in zip(*v)] for n, v in rows.items()}
    base = sum(med[names[0]][:2])
    print(f"fwd+bwd breakdown, {', '.join(f'{k}={v}' for k, v in size.items())}; {torch.get_num_threads()} "
          f"thread(s); process CPU time, median of {repeats}; load average {os.getloadavg()[0]:.1f}\n")
    print("| model | forward (s) | backward (s) | total / first | minor page faults | system time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        f, b, faults, sys_s = med[n]
        print(f"| {n} | {f:.3f} | {b:.3f} | {(f + b) / base:.2f}x | {faults:,.0f} | {sys_s:.3f} |")
    B, H, Hh = size["batch"], size["hidden_size"], size["hyper_size"]
    h = torch.randn(B, H, device=device)
    print("\n| per-step product (B x H) @ (H x N) | N | ms | GFLOP/s |\n|---|---:|---:|---:|")
    from hypernetworks.nn import _fused
    for label, n_out in (("torch.nn.LSTM's W_hh", 4 * H), ("HyperLSTM's [W_h; W_hat_h]", 4 * H + 4 * Hh)):
        w = _fused._step_weight(torch.randn(n_out, H, device=device), B, size["seq_len"])
        for _ in range(3):
            _fused._linear(h, w)
        t = time.process_time()
        for _ in range(20):
            _fused._linear(h, w)
        ms = (time.process_time() - t) / 20 * 1e3
        print(f"| {label} | {n_out} | {ms:.2f} | {2 * B * H * n_out / ms / 1e6:.0f} |")


def peak_memory_here(name: str, size: dict, device: torch.device, packed: bool = False) -> int:
    """Bytes of peak memory one forward+backward needs beyond what is resident before it."""
    x = make_input(size, device, packed)
    torch.manual_seed(0)
    model = build(name, size).to(device)
    _kernels.library()  # load (or build) the step kernels before the baseline, not during the step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    step(model, x)
    return _status_bytes("VmHWM") - base


def peak_memory(name: str, args) -> int | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", name, "--device", args.device,
           "--labml-path", args.labml_path] + (["--quick"] if args.quick else []) + (["--packed"] if args.packed else [])
    cmd += ["--autocast", args.autocast] if args.autocast else []
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        print(f"memory measurement of {name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS, metavar="MODEL",
                   help=f"subset of: {', '.join(MODELS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--packed", action="store_true",
                   help="a PackedSequence batch (lengths uniform in [T/2, T]); default models then include the "
                        "eager per-step path of the hyper cells")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: this process's CPU time, which excludes the time the process "
                        "waits for a core on a loaded machine (meaningful with --threads 1)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="run each forward under torch.autocast in this dtype (mixed precision; backward outside)")
    p.add_argument("--compare-autocast", action="store_true",
                   help="with --autocast: each model in float32 and under autocast, interleaved; one table; then exit")
    p.add_argument("--labml-path", default="/tmp/labml", help="where labml-nn was pip-installed with --target")
    p.add_argument("--profile", default=None, choices=MODELS, metavar="MODEL",
                   help="print torch.profiler's table (self CPU time) of one forward+backward of MODEL and exit")
    p.add_argument("--breakdown", action="store_true",
                   help="per model: forward and backward CPU time, minor page faults and system time (the kernel "
                        "zeroing fresh pages), and the throughput of the per-step product; then exit")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="also write the table as a record (benchmarks/records.py) at PATH, e.g. "
                        "results/speed/rnn-cpu-1thread.json")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    started = None
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from records import conditions

        started = conditions(torch_threads=args.threads or torch.get_num_threads(), clock=args.clock,
                             device=args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    AUTOCAST["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    size = QUICK if args.quick else FULL
    has_labml = labml_available(args.labml_path)

    if args.profile:
        from torch.profiler import profile
        x = make_input(size, device, args.packed)
        model = build(args.profile, size).to(device)
        step(model, x)  # warm-up
        with profile() as prof:
            step(model, x)
        print(f"{args.profile}, one forward+backward; {torch.get_num_threads()} thread(s); load average "
              f"{os.getloadavg()[0]:.1f}; the compiled kernels' time is inside the Functions' self time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        ops = [e for e in prof.events() if e.name.startswith(("aten::", "mkldnn::"))]
        top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "mkldnn::"))]
        print(f"\ntop-level PyTorch ops (views included) per time step, forward + backward: "
              f"{len(top) / size['seq_len']:.0f} (each a kernel launch or dispatch on a GPU)")
        return 0

    if args.breakdown:
        breakdown(list(args.models or ("torch.nn.LSTM", "HyperLSTM", "LN HyperLSTM")), size, device,
                  args.repeats or 5)
        return 0

    if args.compare_autocast:
        if AUTOCAST["dtype"] is None:
            raise SystemExit("--compare-autocast needs --autocast bf16 or fp16")
        names = list(args.models or ("torch.nn.LSTM", "LN LSTM", "HyperLSTM", "LN HyperLSTM"))
        dtype, AUTOCAST["dtype"] = AUTOCAST["dtype"], None
        compare_autocast(names, size, device, args.repeats or (3 if args.quick else 5), args.clock, dtype,
                         args.record, started)
        return 0

    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory_here(args.memory_of, size, device, args.packed)}))
        return 0

    names = list(args.models or (PACKED_DEFAULT if args.packed else DEFAULT))
    if "torch.nn.LSTM" not in names:
        names.insert(0, "torch.nn.LSTM")
    runnable = [n for n in names if n != "labml-nn HyperLSTM" or has_labml]
    repeats = args.repeats or (3 if args.quick else 7)
    times = time_models(runnable, size, device, repeats, args.clock, args.packed)
    mems = {n: (None if args.no_memory else peak_memory(n, args)) for n in runnable}

    desc = ", ".join(f"{k}={v}" for k, v in size.items()) + (", PackedSequence (lengths in [T/2, T])" if args.packed else "")
    desc += f", autocast {args.autocast}" if args.autocast else ""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"fwd+bwd, {desc}; {where}; torch {torch.__version__}; median of {repeats} interleaved rounds; "
          f"{args.clock} clock{load}\n")
    columns = ["model", "fwd+bwd time (s)", "time / torch.nn.LSTM", "peak memory (MiB)", "memory / torch.nn.LSTM"]
    t0, m0 = times["torch.nn.LSTM"], mems["torch.nn.LSTM"]
    rows = []
    for n in names:
        if n not in times:
            rows.append([n, "not installed", "", "", ""])
            continue
        mem = mems[n]
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.0f}"
        mem_r = "n/a" if mem is None or not m0 else f"{mem / m0:.2f}x"
        rows.append([n, f"{times[n]:.3f}", f"{times[n] / t0:.2f}x", mem_s, mem_r])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import emit_table

    emit_table(columns, rows, args.record, title=f"fwd+bwd, {desc}; {where}", started=started,
               values={"seconds": times, "peak_bytes": mems, "size": size, "repeats": repeats})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
