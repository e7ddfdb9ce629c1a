"""Safety: checkpoints cannot run code, damaged files are refused with clear
errors, and training faults stop the run cleanly.

Every corrupted file here is a copy made in ``tmp_path`` (of a small real file, or of one the test
writes); nothing is downloaded (the http tests serve ``tmp_path`` on 127.0.0.1).
"""
from __future__ import annotations

import functools
import gzip
import http.server
import importlib
import inspect
import io
import os
import pkgutil
import re
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule

from hypernetworks.checkpoints import (CheckpointError, check_settings, read_checkpoint, resolve_trusted_class,
                                      verify_archive)
from hypernetworks.tasks.language_model import LanguageModelTask
from hypernetworks.training import (AtomicCheckpointIO, NonFiniteError, StopOnNonFinite, load_task, make_trainer,
                                    remove_stale_temporaries, run_cli)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def _save_lm(path: Path) -> Path:
    """A small, genuine checkpoint of the project's character LM (as load_task reads it)."""
    torch.manual_seed(0)
    task = LanguageModelTask(cell="lstm", hidden_size=8, vocab=list("ab c"))
    hparams = {"_class_path": "hypernetworks.tasks.language_model.LanguageModelTask", **task.hparams}
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams}, path)
    return path


def _payload_checkpoint(path: Path, marker: Path, task: str = "hypernetworks.tasks.translation.TranslationTask",
                        where: str = "dict") -> Path:
    """The issue's checkpoint: weights_only-loadable, asking to build subprocess.Popen (which would
    create ``marker``) through a ``dict[str, Any]`` argument of one of the project's tasks."""
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
    if where == "dict":
        hparams = {"_class_path": task, "model_args": {"x": spec}}
    elif where == "list":
        hparams = {"_class_path": task, "model_args": {"x": [1, {"deeper": spec}]}}
    elif where == "string":  # jsonargparse parses such a string into a class spec and builds it
        hparams = {"_class_path": task, "model_args": {"x": '{"class_path": "subprocess.Popen", "init_args": '
                                                              f'{{"args": "touch {marker}", "shell": true}}}}'}}
    elif where == "task":
        hparams = {"_class_path": "subprocess.Popen", "args": f"touch {marker}", "shell": True}
    else:
        raise AssertionError(where)
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, path)
    return path


def _ran(marker: Path) -> bool:
    time.sleep(0.3)  # a started `touch` would have finished by now
    return marker.exists()


class _Evil:
    """Pickles to a call of os.system: what an unrestricted torch.load would run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture()
def http_folder(tmp_path):
    """Serves ``tmp_path / "www"`` on 127.0.0.1 (a free port); yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _member_data_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(offset, size) of the stored bytes of the first zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if i.filename.endswith(suffix)), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip(path: Path, offset: int, n: int = 4) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- 1. allow-list

def _classes_in(package: str, base: type) -> set[str]:
    pkg = importlib.import_module(package)
    found = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{mod.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, base) and not name.startswith("_"):
                found.add(f"{obj.__module__}.{obj.__qualname__}")
    return found


def test_allow_list_admits_every_task_data_module_and_model_of_the_project():
    import torch.nn as nn

    for package, base in [("hypernetworks.tasks", LightningModule), ("hypernetworks.data", LightningDataModule),
                          ("hypernetworks.models", nn.Module)]:
        names = _classes_in(package, base)
        assert names, package
        for class_path in names:
            check_settings({"class_path": class_path}, "x.ckpt")
            assert resolve_trusted_class(class_path).__module__ + "." + class_path.rpartition(".")[2] == class_path


@pytest.mark.parametrize("class_path", [
    "subprocess.Popen", "os.system", "builtins.eval", "hypernetworks.cli.main",
    "hypernetworks.tasks.classification.create_model",  # a function
    "hypernetworks.data.images.DataLoader",  # torch's, imported into one of our modules
    "hypernetworks.data.images.CIFAR10",  # ours, but not a data module
    "hypernetworks.tasks.classification.subprocess.Popen", "hypernetworks.tasks..x.Y",
    "hypernetworks.tasks.nosuchmodule.Task"])
def test_allow_list_refuses_everything_else(class_path):
    with pytest.raises(CheckpointError, match="x.ckpt"):
        check_settings({"a": [{"b": {"class_path": class_path}}]}, "x.ckpt")
        resolve_trusted_class(class_path, source="x.ckpt")  # the second lock, if the name passed the first


@pytest.mark.parametrize("where", ["dict", "list", "string", "task"])
def test_issue_payload_runs_nothing_through_load_task(tmp_path, where):
    marker = tmp_path / "pwned"
    ckpt = _payload_checkpoint(tmp_path / "payload.ckpt", marker, where=where)
    assert isinstance(torch.load(ckpt, weights_only=True), dict)  # it passes torch's own check
    with pytest.raises(ValueError, match=r"payload\.ckpt.*subprocess\.Popen") as err:
        load_task(ckpt)
    assert isinstance(err.value, CheckpointError)
    assert not _ran(marker)


@pytest.mark.parametrize("where", ["dict", "string"])
def test_issue_payload_runs_nothing_through_fit_ckpt_path(tmp_path, where, capsys):
    """LightningCLI rebuilds the model settings from a local --ckpt_path file through jsonargparse,
    which built subprocess.Popen from this file before the check (verified by hand)."""
    marker = tmp_path / "pwned"
    ckpt = _payload_checkpoint(tmp_path / "payload.ckpt", marker, where=where)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path / "runs"),
                 "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt)])
    assert re.search(r"payload\.ckpt.*subprocess\.Popen", " ".join(capsys.readouterr().err.split()))
    assert not _ran(marker)


def test_payload_in_image_classifier_model_args_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _payload_checkpoint(tmp_path / "img.ckpt", marker, task="hypernetworks.tasks.classification.ImageClassifier")
    with pytest.raises(CheckpointError, match=r"subprocess\.Popen.*model_args\.x"):
        load_task(ckpt)
    assert not _ran(marker)


@pytest.mark.parametrize("command", ["sample", "activity", "translate", "kernels", "handwriting"])
def test_issue_payload_runs_nothing_through_any_command(tmp_path, capsys, command):
    from hypernetworks.cli import main

    marker = tmp_path / "pwned"
    ckpt = str(_payload_checkpoint(tmp_path / "payload.ckpt", marker))
    argv = {"sample": ["sample", ckpt], "activity": ["activity", ckpt, "--out", str(tmp_path)],
            "translate": ["translate", "--checkpoint", ckpt], "kernels": ["kernels", "--checkpoint", ckpt, "--out",
                                                                           str(tmp_path / "k.png")],
            "handwriting": ["handwriting", ckpt, "--out", str(tmp_path / "hw")]}[command]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert "subprocess.Popen" in err and "payload.ckpt" in err
    assert not _ran(marker)


def test_issue_payload_runs_nothing_through_the_demo_server(tmp_path):
    pytest.importorskip("fastapi", reason="the demo server needs fastapi, a dependency of this package (pip install -e .)")
    from fastapi.testclient import TestClient

    from hypernetworks.serve.server import make_app

    marker = tmp_path / "pwned"
    folder = tmp_path / "served"
    folder.mkdir()
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
    # a char-LM class path, so that the server lists the file found in the folder
    torch.save({"state_dict": {}, "hyper_parameters": {
        "_class_path": "hypernetworks.tasks.language_model.LanguageModelTask", "vocab": ["a", spec]}},
        folder / "payload.ckpt")
    with TestClient(make_app([str(folder)]), base_url="http://localhost") as client:
        listed = client.get("/api/checkpoints").json()["checkpoints"]
        assert [c["name"] for c in listed] == ["payload.ckpt"]
        reply = client.post("/api/generate", json={"checkpoint": listed[0]["id"], "length": 5})
    assert reply.status_code >= 400
    assert "subprocess.Popen" in reply.json()["error"] and str(tmp_path) not in reply.text
    assert not _ran(marker)


def test_trusted_classes_argument_admits_a_users_own_task(tmp_path):
    ckpt = _save_lm(tmp_path / "lm.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["_class_path"] = f"{__name__}._UserTask"
    torch.save(raw, ckpt)
    with pytest.raises(CheckpointError, match="_UserTask"):
        load_task(ckpt)
    assert type(load_task(ckpt, trusted_classes=[_UserTask])) is _UserTask


class _UserTask(LanguageModelTask):
    pass


def test_pickle_checkpoint_over_http_is_refused_everywhere(tmp_path, http_folder, capsys):
    www, base = http_folder
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _Evil(f"touch {marker}")}, www / "evil.ckpt")
    url = f"{base}/evil.ckpt"
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*system") as err:
        read_checkpoint(url)
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(ValueError, match="evil.ckpt"):
        AtomicCheckpointIO().load_checkpoint(url)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(url, weights_only=False)
    # the command line: `hypernetworks fit ... --ckpt_path http://...`: one paragraph, exit 1
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path / "runs"),
                 "--model.init_args.hidden_size", "8", "--data.init_args.batch_size", "2",
                 "--data.init_args.seq_len", "8", "--trainer.max_steps", "1", "--trainer.enable_progress_bar",
                 "false", "--trainer.enable_model_summary", "false", "--ckpt_path", url])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "evil.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "pydoc-lstm").exists()  # nothing trained, no run folder left
    assert not _ran(marker)


def test_genuine_checkpoint_over_http_loads_like_a_local_one(tmp_path, http_folder):
    www, base = http_folder
    _save_lm(www / "lm.ckpt")
    local = read_checkpoint(www / "lm.ckpt")
    remote = AtomicCheckpointIO().load_checkpoint(f"{base}/lm.ckpt")
    assert remote.keys() == local.keys()
    for k, v in local["state_dict"].items():
        assert torch.equal(remote["state_dict"][k], v), k
    with pytest.raises(CheckpointError, match="cannot download"):
        read_checkpoint(f"{base}/missing.ckpt")


# ----------------------------------------------------------------------------- integrity

def test_checkpoint_with_flipped_bytes_is_refused(tmp_path):
    ckpt = _save_lm(tmp_path / "lm.ckpt")
    load_task(ckpt)  # intact: loads
    offset, size = _member_data_offset(ckpt, "/data/0")  # a tensor's raw bytes
    damaged = tmp_path / "flipped.ckpt"
    damaged.write_bytes(ckpt.read_bytes())
    _flip(damaged, offset + size // 2)
    # torch alone loads it, silently, with different weights: the case the CRC check is for
    bad = torch.load(damaged, weights_only=True)["state_dict"]
    assert any(not torch.equal(bad[k], v) for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items())
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt is damaged.*CRC"):
        load_task(damaged)
    with pytest.raises(CheckpointError, match="CRC"):
        AtomicCheckpointIO().load_checkpoint(damaged)


def test_truncated_and_foreign_files_get_clear_messages(tmp_path):
    ckpt = _save_lm(tmp_path / "lm.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt is not a checkpoint of this project.*zip"):
        load_task(cut)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt is not a checkpoint of this project"):
        verify_archive(text)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("a.txt", "not torch")
    with pytest.raises(CheckpointError, match=r"other\.zip") as err:
        load_task(other)
    assert "weights_only" not in str(err.value)
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=r"plain\.ckpt is not a checkpoint of this project \(no 'state_dict'"):
        load_task(plain)


# ----------------------------------------------------------------------------- 2. faults

def test_cli_lr_1e30_stops_at_step_1_or_2_nonzero_exit_no_best(tmp_path, shared_data, capsys):
    """``hypernetworks fit --config configs/ptb-small-lstm.yaml --model.init_args.lr 1e30`` with tiny
    step counts. In-process through ``hypernetworks.cli.main`` (the console script's entry point):
    it ends in ``SystemExit(1)`` with the message on stderr and no traceback (a subprocess only adds
    half a minute of imports on a busy machine)."""
    from hypernetworks.cli import main

    real = shared_data / "ptb"
    if not (real / "ptb.char.train.txt").is_file():
        pytest.skip(f"needs the PTB character files in {real}; point HYPERNETWORKS_DATA at a data folder "
                    "that has ptb/ (README, Testing)")
    # the same recipe on the first 20,000 characters of the real training split (validation and test:
    # its first 4,000, so that their characters are in the vocabulary): read in a moment
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    text = (real / "ptb.char.train.txt").read_text(encoding="utf-8")
    for split, n in (("train", 20000), ("valid", 4000), ("test", 4000)):
        (ptb / f"ptb.char.{split}.txt").write_text(text[:n].rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:  # the CLI prints the NonFiniteError as one paragraph
        main(["fit", "--config", str(REPO / "configs/ptb-small-lstm.yaml"), "--model.init_args.lr", "1e30",
              "--runs_root", str(tmp_path), "--run_name", "r", "--data.init_args.root", str(ptb),
              "--data.init_args.batch_size", "4", "--data.init_args.seq_len", "16",
              "--data.init_args.eval_batch_size", "4", "--trainer.max_steps", "6", "--trainer.val_check_interval",
              "2", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    assert err.value.code == 1
    assert err.value.__cause__ is None and err.value.__suppress_context__  # raised "from None"
    msg = capsys.readouterr().err
    assert "Traceback" not in msg and "NonFiniteError" not in msg, msg
    assert msg.startswith("hypernetworks fit: ") or "\nhypernetworks fit: " in msg, msg
    assert "training loss" in msg, msg
    assert int(msg.split(" at step ")[1].split()[0]) in (1, 2), msg
    ckpts = tmp_path / "r" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.glob("best-*.ckpt"))


class _Faulty(LightningModule):
    """A tiny regression whose loss (``bad="loss"``) or gradient (``bad="grad"``) is NaN at
    ``bad_step``; validation logs ``val_loss`` (NaN when ``nan_val``)."""

    monitor = "val_loss"

    def __init__(self, bad: str = "loss", bad_step: int = 2, nan_val: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.bad, self.bad_step, self.nan_val = bad, bad_step, nan_val

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        if self.global_step == self.bad_step:
            if self.bad == "loss":
                loss = loss * float("nan")
            elif self.bad == "grad":
                self.lin.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.weights_seen = getattr(self, "weights_seen", []) + [self.lin.weight.detach().clone()]

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        self.log("val_loss", loss * float("nan") if self.nan_val else loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    val_dataloader = train_dataloader


def _trainer(run_dir, **kw):
    return make_trainer(run_dir, _Faulty, max_steps=6, val_check_interval=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_at_that_step(tmp_path, bad):
    model = _Faulty(bad=bad, bad_step=3)
    with pytest.raises(NonFiniteError, match="at step 3") as err:
        _trainer(tmp_path).fit(model)
    expected = "non-finite training loss (nan)" if bad == "loss" else "non-finite gradient of 'lin.weight' (inf)"
    assert expected in str(err.value)
    assert torch.isfinite(model.lin.weight).all()  # the bad update was never applied
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["best-step=2.ckpt", "last.ckpt"]  # from the validation at step 2, none after
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_skip_batches_drops_only_the_bad_update(tmp_path):
    model = _Faulty(bad="loss", bad_step=3)
    guard = StopOnNonFinite(skip_batches=True)
    trainer = _trainer(tmp_path, callbacks=[guard])
    defaults = [c for c in trainer.callbacks if isinstance(c, StopOnNonFinite)]
    assert len(defaults) == 2  # the recipe's and the default one, which stands aside
    with pytest.warns(UserWarning, match="step 3.*skipped"):
        trainer.fit(model)
    assert trainer.global_step == 6 and guard.skipped == 1
    assert torch.isfinite(model.lin.weight).all()
    # the weights before the steps that follow the skipped one are those before it: no update
    assert torch.equal(model.weights_seen[3], model.weights_seen[4])
    assert not torch.equal(model.weights_seen[2], model.weights_seen[3])


def test_skip_batches_gives_up_after_max_consecutive_skips(tmp_path):
    class AlwaysBad(_Faulty):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (float("nan") if self.global_step >= 1 else 1.0)

    with pytest.raises(NonFiniteError, match="3 bad batches in a row"):
        _trainer(tmp_path, callbacks=[StopOnNonFinite(skip_batches=True, max_consecutive_skips=2)]).fit(AlwaysBad())


def test_non_finite_validation_metric_is_never_the_best_checkpoint(tmp_path):
    with pytest.warns(UserWarning, match="val_loss is nan.*not saved as the best"):
        _trainer(tmp_path).fit(_Faulty(bad="none", nan_val=True))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_stop_on_non_finite_arguments_are_checked():
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        StopOnNonFinite(max_consecutive_skips=0)
    with pytest.raises(ValueError, match="max_abs_loss"):
        StopOnNonFinite(max_abs_loss=0)


def test_leftover_temporary_checkpoints_are_removed_on_the_next_start(tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="POSIX file locks (fcntl) are not available on this system")  # POSIX write locks tell a live write from a killed one

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / ".last.ckpt.k2j4h_9x.tmp"  # what a write killed half-way leaves
    stale.write_bytes(b"partial")
    live = folder / ".best-step=2.ckpt.ab12cd34.tmp"  # another process writing now
    live.write_bytes(b"partial")
    other = folder / ".notes.tmp"  # not ours: kept
    other.write_text("x")
    with open(live, "rb") as h:
        fcntl.flock(h.fileno(), fcntl.LOCK_EX)
        _trainer(tmp_path).fit(_Faulty(bad="none"))
        assert live.exists()
    assert not stale.exists() and other.exists()
    assert remove_stale_temporaries(folder) == [live]  # its writer (the lock) is gone now


# ----------------------------------------------------------------------------- readers

def test_damaged_gz_of_multi30k_names_the_file(tmp_path, shared_data):
    import zlib

    from hypernetworks.data.parallel import read_lines, read_parallel

    src = shared_data / "multi30k_en_fr" / "val.en.gz"
    if not src.is_file():
        pytest.skip(f"needs the Multi30k file {src}; point HYPERNETWORKS_DATA at a data folder that has it "
                    "(README, Testing)")
    causes = set()
    size = src.stat().st_size
    for k, offset in enumerate(range(size // 8, size * 7 // 8, size // 8)):  # damage at several places
        damaged = tmp_path / f"{k}" / "val.en.gz"
        damaged.parent.mkdir()
        damaged.write_bytes(src.read_bytes())
        _flip(damaged, offset, n=16)
        with pytest.raises(ValueError, match=r"val\.en\.gz") as err:
            read_lines(damaged)
        causes.add(type(err.value.__cause__))
    assert zlib.error in causes  # the raw error of the issue, now wrapped
    cut = tmp_path / "val.fr.gz"
    cut.write_bytes((shared_data / "multi30k_en_fr" / "val.fr.gz").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"val\.fr\.gz"):
        read_parallel(src, cut)


def test_damaged_zip_members_of_text_readers_name_the_file(tmp_path):
    from hypernetworks.data.parallel import read_tsv_pairs
    from hypernetworks.data.text import read_enwik8_bytes

    rng = np.random.default_rng(0)
    words = [" ".join(rng.choice(["le", "chat", "the", "cat", "noir", "black"], 6)) for _ in range(2000)]
    for name, member, text, read in [("enwik8.zip", "enwik8", "\n".join(words), read_enwik8_bytes),
                                     ("fra-eng.zip", "fra.txt", "\n".join(f"{w}\t{w}" for w in words) + "\n",
                                      read_tsv_pairs)]:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, text)
        read(path)  # intact: reads
        offset, size = _member_data_offset(path, member)
        _flip(path, offset + size // 2, n=16)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            read(path)


def _small_npz(path: Path) -> Path:
    from hypernetworks.data.strokes import StrokeLines, save_npz

    rng = np.random.default_rng(0)
    strokes = np.concatenate([rng.integers(-20, 20, (400, 2)), (rng.random((400, 1)) < 0.1)], 1).astype(np.int16)
    lines = StrokeLines(strokes=strokes, line_offsets=np.arange(0, 401, 40), line_ids=np.array(
        [f"a01-000-{i:02d}" for i in range(10)]), texts=np.array(["x"] * 10))
    save_npz(lines, path)
    return path


def test_damaged_npz_of_iam_names_the_file(tmp_path):
    import zlib

    from hypernetworks.data.strokes import StrokeDataError, load_npz

    path = _small_npz(tmp_path / "iam.npz")
    assert len(load_npz(path)) == 10
    offset, size = _member_data_offset(path, "strokes.npy")
    causes = set()
    for k in range(1, 8):
        damaged = tmp_path / f"{k}" / "iam.npz"
        damaged.parent.mkdir()
        damaged.write_bytes(path.read_bytes())
        _flip(damaged, offset + size * k // 8, n=16)
        with pytest.raises(StrokeDataError, match=r"iam\.npz") as err:
            load_npz(damaged)
        causes.add(type(err.value.__cause__))
    assert zlib.error in causes  # the raw error of the issue, now wrapped


def _small_cifar_tar(path: Path, per_class: int = 3) -> Path:
    from PIL import Image

    from hypernetworks.data.images import CIFAR10_CLASSES

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in CIFAR10_CLASSES:
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


def test_truncated_or_damaged_cifar_tarball_never_drops_classes(tmp_path):
    from hypernetworks.data.images import DatasetFileError, read_cifar10_jpeg_tar

    tar = _small_cifar_tar(tmp_path / "cifar10_jpg.tar.gz")
    data, labels = read_cifar10_jpeg_tar(tar, train=True, limit_per_class=2)
    assert np.bincount(labels).tolist() == [2] * 10
    raw = tar.read_bytes()
    # an uncompressed copy cut after a whole member: tarfile then just stops, silently
    plain = tmp_path / "plain.tar"
    plain.write_bytes(gzip.decompress(raw))
    with tarfile.open(plain) as t:
        cut_at = next(m for m in t.getmembers() if m.name.startswith("train/dog/")).offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes()[:cut_at])
    with pytest.raises(DatasetFileError, match=r"cut\.tar.*per class"):
        read_cifar10_jpeg_tar(cut, train=True, limit_per_class=2)
    for n, name in [(len(raw) // 3, "third.tar.gz"), (len(raw) - 5, "tail.tar.gz")]:
        short = tmp_path / name
        short.write_bytes(raw[:n])
        with pytest.raises(DatasetFileError, match=name.replace(".", r"\.")):
            read_cifar10_jpeg_tar(short, train=True, limit_per_class=2)
    flipped = tmp_path / "flipped.tar.gz"
    flipped.write_bytes(raw)
    _flip(flipped, len(raw) // 3, n=32)
    with pytest.raises(DatasetFileError, match=r"flipped\.tar\.gz"):
        read_cifar10_jpeg_tar(flipped, train=True, limit_per_class=2)
