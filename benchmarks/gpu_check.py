"""One command for a machine with a GPU: the CUDA correctness suite, the speed table and a time-budgeted
run of the paper-size PTB recipe, each written as a JSON record.

    python benchmarks/gpu_check.py                         # one GPU: all three parts, under 8 minutes
    python benchmarks/gpu_check.py --only correctness speed
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check   # smoke run on CPU (CI)

Needs: torch and Lightning (with what Lightning itself installs: torchmetrics, PyYAML, numpy) and this
checkout's ``src/``, which is put on ``sys.path`` when the package is not installed; on CUDA the fused
paths use triton (which CUDA builds of torch bring) for their step kernels, PyTorch ops without it. Nothing else of the
project's dependencies is imported (no jsonargparse, fastapi, matplotlib): the recipe's YAML is read
with PyYAML and the task, data module and Trainer are built directly.

Parts (``--only`` picks some), each one record ``<part>-<UTC time>.json`` under ``--out`` (default
``results/gpu/``) holding the command, the machine (CPU, GPU, driver, CUDA/cuDNN), the torch and
Lightning versions, the date and the values:

* ``correctness``: every recurrent layer (HyperLSTM, LN HyperLSTM, LN LSTM, LSTM) in four shapes (one
  layer; two layers; bidirectional; a PackedSequence batch of unequal lengths), outputs, final states
  and all gradients of the fused path (with the device's step kernels, and with PyTorch ops) and of the
  eager per-step path on the device, in float32 and float64, against the eager path in float64 on CPU; recurrent dropout in training mode (fused and eager
  draw the same masks under one seed, so they must agree); torch.autocast in bf16 (and fp16 with a
  GradScaler on CUDA) against float32; the opt-in CUDA-graph wrapper (``cuda_graphed``) against eager.
* ``speed``: ``benchmarks/rnn_speed.py``'s measurement: torch.nn.LSTM (cuDNN on a GPU) against
  HyperLSTM, LN HyperLSTM and LN LSTM (on CUDA also with PyTorch ops instead of the Triton step kernels,
  and replayed as CUDA graphs) at the PTB size (input 50,
  hidden 1000, hyper 128, N_z 4, 100 steps), batch 64 and 128: forward + backward time, median of
  interleaved rounds, and peak memory of one forward + backward.
* ``ptb``: ``configs/ptb-ln-hyperlstm.yaml`` (paper size, batch 128 x 100) trained for ``--ptb-seconds``
  of wall time (Lightning's max_time, validation included), then one full validation: validation bpc,
  seconds per training step (median, synchronised), steps and epochs done, the estimated epoch time.

``--quick``: tiny sizes, few rounds and a tiny PTB model on a generated stand-in corpus (unless
``--ptb-data`` names a folder with Mikolov's ptb.char.*.txt): an end-to-end check of the script itself,
not a measurement. What only CUDA can do (CUDA graphs, fp16 with a GradScaler, peak GPU memory) is
recorded as skipped elsewhere. Exit status 1 when a correctness check or a part fails.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (REPO / "src", HERE):  # the package from this checkout when not installed; rnn_speed.py beside
    if str(_p) not in sys.path:
        sys.path.insert(0 if _p == REPO / "src" else len(sys.path), str(_p))

import rnn_speed  # noqa: E402
from hypernetworks.nn import LSTM, HyperLSTM  # noqa: E402

PARTS = ("correctness", "speed", "ptb")
RECIPE = REPO / "configs" / "ptb-ln-hyperlstm.yaml"
SPEED_MODELS = ("torch.nn.LSTM", "HyperLSTM", "LN HyperLSTM", "LN LSTM")


# -- records ------------------------------------------------------------------------------------
def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    import lightning

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "lightning": lightning.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        from importlib.metadata import version

        info["triton"] = version("triton")
    except Exception:  # not installed
        info["triton"] = None
    info["step_kernels"] = {str(d).replace("torch.", ""): step_kernels(device, d) for d in (torch.float32, torch.float64)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = res.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    return info


def write_record(out: Path, part: str, args, device: torch.device, values: dict, passed: bool,
                 started: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{part}-{stamp}{'-quick' if args.quick else ''}.json"
    record = {"part": part, "command": " ".join(["python", "benchmarks/gpu_check.py", *args.argv]),
              "date": utc_now(), "device": str(device), "quick": bool(args.quick), "passed": bool(passed),
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
              "machine": machine(device), "values": values}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# -- the fused paths' step kernels ---------------------------------------------------------------
def step_kernels(device: torch.device, dtype=torch.float32) -> str:
    """Which step kernels the fused paths use for tensors of this device and dtype."""
    from hypernetworks.nn import _fused

    lib = _fused._kernels_for(torch.empty(0, device=device, dtype=dtype))
    if lib is None:
        return "PyTorch ops"
    return "Triton kernels" if device.type == "cuda" else "C++ kernels"


@contextlib.contextmanager
def torch_ops_only():
    """The fused paths with PyTorch ops instead of the C++ (CPU) or Triton (CUDA) step kernels."""
    from hypernetworks.nn import _kernels

    saved, saved_env = dict(_kernels._state), os.environ.get(rnn_speed.TRITON_ENV)
    _kernels._state.update(lib=None, why="gpu_check: PyTorch-op path")
    os.environ[rnn_speed.TRITON_ENV] = "0"
    try:
        yield
    finally:
        _kernels._state.clear()
        _kernels._state.update(saved)
        if saved_env is None:
            os.environ.pop(rnn_speed.TRITON_ENV, None)
        else:
            os.environ[rnn_speed.TRITON_ENV] = saved_env


# -- correctness --------------------------------------------------------------------------------
SMALL = dict(I=6, H=24, HH=12, NZ=4, T=16, B=5)


def _build(kind: str, shape: str, s: dict, **kw) -> torch.nn.Module:
    layers = {"two layers": 2}.get(shape, 1)
    common = dict(num_layers=layers, bidirectional=shape == "bidirectional", **kw)
    if kind.endswith("HyperLSTM"):
        return HyperLSTM(s["I"], s["H"], hyper_size=s["HH"], embedding_size=s["NZ"],
                         layer_norm=kind.startswith("LN"), **common)
    return LSTM(s["I"], s["H"], layer_norm=kind.startswith("LN"), **common)


def _cells(m):
    return [*m.cells, *getattr(m, "cells_reverse", [])]


def _inputs(shape: str, s: dict, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s["T"], s["B"], s["I"], generator=g, dtype=torch.float64)
    hx = None
    if shape == "packed":
        lengths = torch.linspace(s["T"], s["T"] // 3, s["B"]).long()[torch.randperm(s["B"], generator=g)]
        return torch.nn.utils.rnn.pack_padded_sequence(x.to(device, dtype), lengths, enforce_sorted=False), hx
    return x.to(device, dtype), hx


def _loss(out, state):
    """A loss that touches every output and state, scaled like a training loss (a mean)."""
    w = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float32).view_as(out)
    total = (out.float() * w).sum() + sum((k + 1) * s.float().pow(2).sum() for k, s in enumerate(state))
    return total / out.numel()


def _run(m, x, fused: bool, amp_dtype=None, scaler=None):
    """Output, state and every gradient of a loss touching all outputs and states."""
    for c in _cells(m):
        c.fused = fused
    m.zero_grad(set_to_none=True)
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        data = x.data.detach().clone().requires_grad_()
        x_in = torch.nn.utils.rnn.PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        data = x_in = x.detach().clone().requires_grad_()
    dev = data.device.type
    with torch.autocast(dev, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out, state = m(x_in)
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = _loss(out, state)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    inv = 1.0 / scaler.get_scale() if scaler is not None else 1.0
    grads = [data.grad * inv] + [(p.grad * inv if p.grad is not None else torch.zeros_like(p)) for p in m.parameters()]
    return [out, *state, *grads]


def _err(got: list, want: list, norm: bool = False) -> tuple[float, bool]:
    """Largest error over all tensors (output, states, every gradient), each relative to that tensor's
    largest magnitude (``norm``: the error's norm relative to the tensor's, for low precision); and
    whether all are finite."""
    worst, finite = 0.0, True
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        finite = finite and bool(torch.isfinite(a).all())
        if norm:
            err = (a - b).norm().item() / max(b.norm().item(), 1e-12)
        else:
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        worst = max(worst, err)
    return worst, finite


def correctness(device: torch.device, quick: bool) -> tuple[dict, bool]:
    """The checks, in full float32 (TF32 off for cuBLAS and cuDNN while they run)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _correctness(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _correctness(device: torch.device) -> tuple[dict, bool]:
    from hypernetworks.nn import _sequence

    s = SMALL
    checks = []

    def check(name, got, want, tol, norm=False):
        err, finite = _err(got, want, norm)
        checks.append({"check": name, "rel_err": float(f"{err:.3g}"), "tol": tol, "finite": finite,
                       "metric": "norm of error / norm" if norm else "max abs error / max abs",
                       "passed": finite and err <= tol})

    kinds = ("HyperLSTM", "LN HyperLSTM", "LN LSTM", "LSTM")
    shapes = ("one layer", "two layers", "bidirectional", "packed")
    for kind in kinds:
        for shape in shapes:
            torch.manual_seed(0)
            ref_model = _build(kind, shape, s).double()
            with torch.no_grad():  # away from the special initial values (d = 0.1, zero dynamic bias)
                for p in ref_model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            x64, _ = _inputs(shape, s, torch.float64, "cpu")
            want = _run(ref_model, x64, fused=False)
            for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-3)):
                m = _build(kind, shape, s).to(device, dtype)
                m.load_state_dict(ref_model.state_dict())
                x, _ = _inputs(shape, s, dtype, device)
                name = f"{kind}, {shape}, {str(dtype).replace('torch.', '')} on {device.type}"
                check(f"{name}: fused ({step_kernels(device, dtype)}) vs float64 CPU eager", _run(m, x, fused=True),
                      want, tol)
                if step_kernels(device, dtype) != "PyTorch ops":
                    with torch_ops_only():
                        check(f"{name}: fused (PyTorch ops) vs float64 CPU eager", _run(m, x, fused=True), want, tol)
                check(f"{name}: eager vs float64 CPU eager", _run(m, x, fused=False), want, tol)
    # recurrent dropout in training mode: fused and eager draw the same masks in the same order
    for kind in kinds:
        m = _build(kind, "two layers", s, recurrent_dropout=0.25, dropout=0.1).to(device).train()
        x, _ = _inputs("one layer", s, torch.float32, device)
        torch.manual_seed(3)
        got = _run(m, x, fused=True)
        torch.manual_seed(3)
        check(f"{kind}, two layers, recurrent dropout 0.25 (train): fused vs eager, same seed", got,
              _run(m, x, fused=False), 2e-4)
    # autocast: bf16 everywhere, fp16 with a GradScaler on CUDA
    amp = [(torch.bfloat16, None, 0.15)]  # bf16 keeps ~3 significant digits, fp16 ~4 (max over ~40 tensors)
    if device.type == "cuda":
        amp.append((torch.float16, torch.amp.GradScaler("cuda", init_scale=2.0**10), 0.03))
    for kind in kinds:
        torch.manual_seed(0)
        m = _build(kind, "two layers", s).to(device)
        x, _ = _inputs("one layer", s, torch.float32, device)
        want = _run(m, x, fused=True)
        for amp_dtype, scaler, tol in amp:
            label = str(amp_dtype).replace("torch.", "") + (" + GradScaler" if scaler is not None else "")
            check(f"{kind}, two layers, autocast {label} on {device.type}: fused vs float32",
                  _run(m, x, fused=True, amp_dtype=amp_dtype, scaler=scaler), want, tol, norm=True)
    # the opt-in CUDA-graph replay (on CPU it falls back to the layer itself)
    skipped = []
    for kind in ("HyperLSTM", "LN HyperLSTM", "LN LSTM"):
        torch.manual_seed(0)
        m = _build(kind, "one layer", s).to(device)
        x, _ = _inputs("one layer", s, torch.float32, device)
        x = x.requires_grad_()
        want = _run(m, x, fused=True)
        g = _sequence.cuda_graphed(m, x)
        if not g.graphed:
            skipped.append(f"cuda_graphed({kind}): {g.why_not}")
        check(f"{kind}: cuda_graphed replay vs eager call ({'graph' if g.graphed else 'fallback'})",
              _run_graphed(g, x), want, 1e-5 if g.graphed else 0.0)
    passed = all(c["passed"] for c in checks)
    return {"sizes": s, "checks": checks, "failed": [c["check"] for c in checks if not c["passed"]],
            "skipped": skipped}, passed


def _run_graphed(g, x):
    m = g.module
    m.zero_grad(set_to_none=True)
    data = x.detach().clone().requires_grad_()
    out, state = g(data)
    _loss(out, state).backward()
    return [out, *state, data.grad, *[(p.grad if p.grad is not None else torch.zeros_like(p)) for p in m.parameters()]]


# -- speed --------------------------------------------------------------------------------------
def speed(device: torch.device, quick: bool, repeats: int | None) -> tuple[dict, bool]:
    base = dict(rnn_speed.QUICK if quick else rnn_speed.FULL)
    batches = (4, 8) if quick else (64, 128)
    repeats = repeats or (2 if quick else 7)
    tables, skipped = {}, []
    for batch in batches:
        size = dict(base, batch=batch)
        names = list(SPEED_MODELS)
        if device.type == "cuda" and step_kernels(device) != "PyTorch ops":  # what the step kernels gain
            names += [f"{n} (torch ops)" for n in ("HyperLSTM", "LN HyperLSTM", "LN LSTM")]
        times = rnn_speed.time_models(names, size, device, repeats)
        rows = {n: {"seconds": times[n], "x_torch_lstm": times[n] / times["torch.nn.LSTM"]} for n in names}
        if device.type == "cuda":
            for n in names:
                torch.cuda.empty_cache()
                rows[n]["peak_mib"] = rnn_speed.peak_memory_here(n, size, device) / 2**20
                rows[n]["memory_x_torch_lstm"] = rows[n]["peak_mib"] / rows["torch.nn.LSTM"]["peak_mib"]
        # the CUDA-graph replays of the same layers (opt-in wrapper), timed the same way
        for n, (t, pool) in _time_graphed(("HyperLSTM", "LN HyperLSTM", "LN LSTM"), size, device, repeats,
                                          skipped).items():
            rows[f"{n} (CUDA graph)"] = {"seconds": t, "x_torch_lstm": t / times["torch.nn.LSTM"],
                                         "graph_memory_mib": pool}
        if device.type != "cuda":
            skipped.append("peak memory: measured on CUDA only here (CPU: benchmarks/rnn_speed.py, a subprocess per model)")
        tables[f"batch {batch}"] = {"size": size, "rows": rows}
    return {"repeats": repeats, "clock": "wall, synchronised", "tables": tables, "skipped": sorted(set(skipped)),
            "markdown": _markdown(tables)}, True


def _time_graphed(names, size, device, repeats, skipped) -> dict:
    from hypernetworks.nn import _sequence

    if device.type != "cuda":
        skipped.append("CUDA-graph rows: CUDA only")
        return {}
    x = rnn_speed.make_input(size, device, False)  # as the eager rows: no gradient for the input
    out, graphs, pools = {}, {}, {}
    for n in names:
        torch.manual_seed(0)
        m = rnn_speed.build(n, size).to(device)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        g = _sequence.cuda_graphed(m, x)
        if not g.graphed:
            skipped.append(f"{n} (CUDA graph): {g.why_not}")
            continue
        torch.cuda.synchronize(device)
        pools[n] = (torch.cuda.memory_allocated(device) - before) / 2**20  # static buffers + the graphs' pool
        graphs[n] = g
    times = {n: [] for n in graphs}
    for r in range(repeats + 1):
        for n, g in graphs.items():
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            o, _ = g(x)
            o.sum().backward()
            torch.cuda.synchronize(device)
            if r:
                times[n].append(time.perf_counter() - t0)
            g.module.zero_grad(set_to_none=True)
    for n, v in times.items():
        out[n] = (statistics.median(v), pools[n])
    graphs.clear()
    torch.cuda.empty_cache()
    return out


def _markdown(tables: dict) -> str:
    lines = []
    for label, t in tables.items():
        lines += [f"\n{label}:\n", "| model | fwd+bwd (s) | / torch.nn.LSTM | peak memory (MiB) | / torch.nn.LSTM |",
                  "|---|---:|---:|---:|---:|"]
        for n, r in t["rows"].items():
            if "peak_mib" in r:
                mem, memx = f"{r['peak_mib']:.0f}", f"{r['memory_x_torch_lstm']:.2f}x"
            elif "graph_memory_mib" in r:
                mem, memx = f"{r['graph_memory_mib']:.0f} (graph buffers)", ""
            else:
                mem, memx = "n/a", "n/a"
            lines.append(f"| {n} | {r['seconds']:.4f} | {r['x_torch_lstm']:.2f}x | {mem} | {memx} |")
    return "\n".join(lines)


# -- the PTB recipe -----------------------------------------------------------------------------
STAND_IN = ("the quick brown fox jumps over the lazy dog while the market closed higher on news of "
            "a merger between two banks and a drop in oil prices n't it 's N years old \n")


def _stand_in_corpus(folder: Path) -> Path:
    """A tiny corpus in Mikolov's ptb.char format (one token per character, '_' for a space)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, reps in (("train", 60), ("valid", 8), ("test", 8)):
        text = STAND_IN * reps
        (folder / f"ptb.char.{split}.txt").write_text(
            " ".join("_" if ch == " " else ch for ch in text.replace("\n", "")) + " \n")
    return folder


class _StepTimer:
    """Lightning callback: synchronised wall time of each training step."""

    def __init__(self, device: torch.device):
        import lightning.pytorch as pl

        outer = self

        class CB(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                rnn_speed.sync(device)
                outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                rnn_speed.sync(device)
                outer.times.append(time.perf_counter() - outer.t0)

        self.times: list[float] = []
        self.t0 = 0.0
        self.callback = CB()


def ptb(device: torch.device, quick: bool, seconds: float, data: str | None, out: Path,
        precision: str) -> tuple[dict, bool]:
    import lightning.pytorch as pl
    import yaml

    from hypernetworks.data.root import dataset_dir
    from hypernetworks.data.text import PTBCharDataModule
    from hypernetworks.tasks.language_model import LanguageModelTask

    cfg = yaml.safe_load(RECIPE.read_text())
    model_args = dict(cfg["model"]["init_args"])
    data_args = dict(cfg["data"]["init_args"])
    tr = cfg.get("trainer", {})
    note = None
    if quick:
        model_args.update(hidden_size=32, hyper_size=16)
        data_args.update(batch_size=8, seq_len=20, eval_batch_size=8)
    root = Path(data) if data else None
    if root is None:
        default = Path(dataset_dir("ptb"))
        if quick or not (default / "ptb.char.train.txt").is_file():
            if not quick:
                return {"skipped": f"PTB char files not found in {default} (set HYPERNETWORKS_DATA or --ptb-data)"}, False
            root = _stand_in_corpus(out / "_ptb_stand_in")
            note = "a generated stand-in corpus (the --quick run checks the script, it measures nothing)"
        else:
            root = default
    pl.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    dm = PTBCharDataModule(root=str(root), **data_args)
    task = LanguageModelTask(**model_args)
    timer = _StepTimer(device)
    extra = dict(max_steps=12, limit_val_batches=4) if quick else {}
    trainer = pl.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                         max_epochs=tr.get("max_epochs", 50), max_time={"seconds": seconds},
                         gradient_clip_val=tr.get("gradient_clip_val"), val_check_interval=tr.get("val_check_interval", 1.0),
                         precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out / "_ptb_run"),
                         callbacks=[timer.callback], **extra)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    fit_s = time.perf_counter() - t0
    in_fit_val = trainer.callback_metrics.get("val_bpc")
    t1 = time.perf_counter()
    final = trainer.validate(task, datamodule=dm, verbose=False)[0]["val_bpc"]
    val_s = time.perf_counter() - t1
    steps_per_epoch = trainer.num_training_batches
    timed = timer.times[5:] if len(timer.times) > 10 else timer.times
    per_step = statistics.median(timed) if timed else float("nan")
    values = {
        "recipe": str(RECIPE.relative_to(REPO)), "model": model_args, "data": data_args, "data_folder": str(root),
        "precision": precision, "budget_seconds": seconds, "fit_seconds": round(fit_s, 1),
        "steps": trainer.global_step, "steps_per_epoch": steps_per_epoch,
        "epochs_done": round(trainer.global_step / steps_per_epoch, 3) if steps_per_epoch else None,
        "seconds_per_step_median": round(per_step, 4), "seconds_per_step_mean": round(statistics.mean(timed), 4) if timed else None,
        "estimated_epoch_seconds": round(per_step * steps_per_epoch, 1) if steps_per_epoch else None,
        "val_bpc_last_in_fit": None if in_fit_val is None else round(float(in_fit_val), 4),
        "val_bpc_final": round(float(final), 4), "final_validation_seconds": round(val_s, 1),
        "parameters": sum(p.numel() for p in task.parameters()),
    }
    if note:
        values["note"] = note
    ok = bool(torch.isfinite(torch.tensor(final)))
    return values, ok


TOTAL_SECONDS = 480  # the whole command's target
PTB_OVERHEAD = 100   # the PTB part beyond its training budget: data, final validation, start-up (a guess)


def ptb_budget(quick: bool, elapsed: float) -> float:
    """The PTB part's training budget: 210 s, or what is left of the 8 minutes after the parts before."""
    if quick:
        return 60.0
    return max(60.0, min(210.0, TOTAL_SECONDS - PTB_OVERHEAD - elapsed - 30))


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end, measures nothing")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    p.add_argument("--out", default=str(REPO / "results" / "gpu"), help="folder for the JSON records")
    p.add_argument("--repeats", type=int, default=None, help="speed: timed rounds (default 7; quick 2)")
    p.add_argument("--ptb-seconds", type=float, default=None,
                   help="ptb: training wall-clock budget in seconds (default: 210, less if the parts before took "
                        "long, so that the whole run stays under 8 minutes; at least 60; quick 60)")
    p.add_argument("--ptb-data", default=None, help="ptb: folder with ptb.char.{train,valid,test}.txt "
                   "(default: the data folder's ptb/, as the recipe; quick: a generated stand-in)")
    p.add_argument("--ptb-precision", default="32-true",
                   help="ptb: Lightning precision (default 32-true, the recipe's; e.g. bf16-mixed)")
    args = p.parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu --quick for a smoke run)")
    out = Path(args.out)
    status = 0
    t_start = time.perf_counter()
    for part in args.only:
        started = time.perf_counter()
        print(f"[gpu_check] {part} ...", flush=True)
        try:
            if part == "correctness":
                values, passed = correctness(device, args.quick)
            elif part == "speed":
                values, passed = speed(device, args.quick, args.repeats)
            else:
                seconds = args.ptb_seconds or ptb_budget(args.quick, time.perf_counter() - t_start)
                values, passed = ptb(device, args.quick, seconds, args.ptb_data, out, args.ptb_precision)
        except Exception as e:  # record the failure and go on with the next part
            values, passed = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}, False
        path = write_record(out, part, args, device, values, passed, started)
        if "error" in values:
            summary = values["error"]
        elif part == "correctness":
            summary = f"{len(values['checks'])} checks, failed: {values['failed'] or 'none'}; skipped: {values['skipped']}"
        elif part == "speed":
            summary = values["markdown"]
        else:
            summary = {k: values.get(k) for k in ("val_bpc_final", "seconds_per_step_median", "epochs_done",
                                                  "estimated_epoch_seconds", "skipped") if k in values}
        print(f"[gpu_check] {part}: {'passed' if passed else 'FAILED'} in {time.perf_counter() - started:.0f} s "
              f"-> {path}\n{summary if isinstance(summary, str) else json.dumps(summary, indent=1)}", flush=True)
        status |= 0 if passed else 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
