"""Checkpoints are data on every path: saved settings never become code, untrusted files cost
bounded time, and every command ends a refused file, damaged data, bad settings or a full disk
with one paragraph and no leftover run folder.

The payloads are written here into ``tmp_path``; each would create a marker file if any code in
it ran. Nothing is downloaded (the http tests serve from 127.0.0.1).
"""
from __future__ import annotations

import errno
import http.server
import io
import socketserver
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from hypernetworks.checkpoints import (CheckpointError, checkpoint_settings, read_checkpoint, verify_archive)
from hypernetworks.tasks.classification import ImageClassifier
from hypernetworks.tasks.language_model import LanguageModelTask
from hypernetworks.training import AtomicCheckpointIO, load_task, run_cli

REPO = Path(__file__).resolve().parents[1]
PYDOC = str(REPO / "configs/pydoc-lstm.yaml")
LM = "hypernetworks.tasks.language_model.LanguageModelTask"
IMG = "hypernetworks.tasks.classification.ImageClassifier"


def _ran(marker: Path) -> bool:
    time.sleep(0.3)  # a started `touch` would have finished by now
    return marker.exists()


def _save(path: Path, hparams: dict, state_dict: dict | None = None) -> Path:
    torch.save({"state_dict": state_dict or {}, "hyper_parameters": hparams}, path)
    return path


def _lm_checkpoint(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    task = LanguageModelTask(cell="lstm", hidden_size=8, vocab=list("ab c"))
    return _save(path, {"_class_path": LM, **task.hparams, **overrides}, task.state_dict())


def _payloads(marker: Path) -> dict[str, object]:
    """Values that jsonargparse would decode into a subprocess.Popen spec (or a YAML python tag)."""
    return {
        "json-escape": '{"class\\u005fpath": "subprocess.Popen", "init_args": {"args": ["touch", "%s"]}}' % marker,
        "yaml-escape": '{"class\\x5fpath": "subprocess.Popen", "init_args": {"args": ["touch", "%s"]}}' % marker,
        "yaml-tag": f"!!python/object/apply:subprocess.Popen [[touch, {marker}]]",
        "json-in-json": '"{\\"class_path\\": \\"subprocess.Popen\\", \\"init_args\\": {\\"args\\": \\"x\\"}}"',
        "nested-dict": {"a": {"b": [1, {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}]}},
    }


# ----------------------------------------------------------------------------- 1. settings are data

@pytest.mark.parametrize("kind", list(_payloads(Path("m"))))
def test_payload_in_dict_any_setting_refused_by_load_task(tmp_path, kind):
    marker = tmp_path / "pwned"
    value = _payloads(marker)[kind]
    ckpt = _save(tmp_path / "p.ckpt", {"_class_path": IMG, "model": "mnist-hyper", "model_args": {"channels": value}})
    with pytest.raises(CheckpointError, match=r"p\.ckpt"):
        load_task(ckpt)
    assert not _ran(marker)


@pytest.mark.parametrize("command", ["fit", "test"])
@pytest.mark.parametrize("kind", ["json-escape", "yaml-escape", "yaml-tag", "nested-dict"])
def test_payload_runs_nothing_through_ckpt_path(tmp_path, capsys, command, kind):
    """The reproducer: an allowed task class whose dict[str, Any] setting holds an escaped class
    spec; LightningCLI's own path decodes it while parsing the checkpoint's settings."""
    marker = tmp_path / "pwned"
    ckpt = _save(tmp_path / "p.ckpt", {"_class_path": IMG, "model": "mnist-hyper",
                                       "model_args": {"channels": _payloads(marker)[kind]}})
    with pytest.raises(SystemExit) as exit_:
        run_cli([command, "--config", str(REPO / "configs/mnist-hyper-cpu.yaml"), "--runs_root",
                 str(tmp_path / "runs"), "--ckpt_path", str(ckpt)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "p.ckpt" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 5
    assert not _ran(marker)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_yaml_tag_string_in_a_str_setting_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _lm_checkpoint(tmp_path / "lm.ckpt", cell=_payloads(marker)["yaml-tag"])
    with pytest.raises(CheckpointError, match="class spec written as a string"):
        load_task(ckpt)
    assert not _ran(marker)


def test_checkpoint_of_another_task_class_is_refused_by_the_recipe(tmp_path, capsys):
    ckpt = _lm_checkpoint(tmp_path / "lm.ckpt")
    with pytest.raises(SystemExit):
        run_cli(["test", "--config", str(REPO / "configs/mnist-hyper-cpu.yaml"), "--runs_root", str(tmp_path / "r"),
                 "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert "LanguageModelTask" in err and "ImageClassifier" in err and "recipe" in err


def test_settings_are_checked_against_the_signature():
    ok = checkpoint_settings(LanguageModelTask, {"_class_path": LM, "_instantiator": "x", "hidden_size": 8,
                                                 "lr": 1, "vocab": ["a", "{"], "gone_in_this_version": 3}, "s.ckpt")
    assert ok == {"hidden_size": 8, "lr": 1, "vocab": ["a", "{"]}  # unknown names dropped; int for a float is fine
    for bad, match in [({"hidden_size": "128"}, "hidden_size"), ({"hidden_size": True}, "hidden_size"),
                       ({"vocab": "abc"}, "vocab"), ({"lr": [1.0]}, "lr"), ({"vocab": [object()]}, "plain"),
                       ({"hidden_size": torch.ones(1)}, "plain")]:
        with pytest.raises(CheckpointError, match=match):
            checkpoint_settings(LanguageModelTask, bad, "s.ckpt")
    # a string that is ordinary text stays a string (never decoded)
    assert checkpoint_settings(ImageClassifier, {"model_args": {"note": '{"a": 1}'}}, "s.ckpt") == {
        "model_args": {"note": '{"a": 1}'}}


def test_wrong_type_and_absurd_size_settings_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_task(_lm_checkpoint(tmp_path / "a.ckpt", hidden_size="8"))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="inconsistent"):  # 10**6 units would be ~16 TB of weights
        load_task(_lm_checkpoint(tmp_path / "b.ckpt", hidden_size=10**6))
    assert time.perf_counter() - t0 < 30  # refused from the meta-device build, nothing allocated
    with pytest.raises(CheckpointError, match="do not load|inconsistent"):
        load_task(_lm_checkpoint(tmp_path / "c.ckpt", hidden_size=9))


def test_sample_command_ends_bad_settings_with_one_paragraph(tmp_path, capsys):
    from hypernetworks.cli import main

    try:
        code = main(["sample", str(_lm_checkpoint(tmp_path / "a.ckpt", hidden_size="8"))])
    except SystemExit as e:
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert "hidden_size" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4


def test_test_ckpt_path_uses_the_checkpoints_own_settings(tmp_path):
    """A genuine checkpoint's settings still override the recipe's (as LightningCLI does), as data."""
    common = ["--config", PYDOC, "--runs_root", str(tmp_path), "--run_name", "r", "--trainer.enable_progress_bar",
              "false", "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "4",
              "--data.init_args.seq_len", "16", "--data.init_args.eval_batch_size", "4"]
    run_cli(["fit", *common, "--model.init_args.hidden_size", "12", "--trainer.max_steps", "2",
             "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"])
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    cli = run_cli(["test", *common, "--ckpt_path", str(last), "--trainer.limit_test_batches", "1"])
    assert cli.model.hparams.hidden_size == 12  # the recipe says 160


# ----------------------------------------------------------------------------- 2. bounded costs

def test_compressed_member_is_refused_before_any_crc_pass(tmp_path):
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB deflating to ~64 KiB
    assert bomb.stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="compressed"):
        verify_archive(bomb)
    assert time.perf_counter() - t0 < 0.5
    # torch.save's own archives are stored, and pass
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    verify_archive(io.BytesIO(buf.getvalue()), "ok")


def test_member_count_and_total_size_limits(tmp_path):
    many = tmp_path / "many.ckpt"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(30):
            zf.writestr(f"archive/data/{i}", b"x" * 100)
    with pytest.raises(CheckpointError, match="30 archive members"):
        verify_archive(many, max_members=20)
    with pytest.raises(CheckpointError, match="3,000 bytes"):
        verify_archive(many, max_bytes=2000)
    verify_archive(many)


class _Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        for _ in range(200):  # a byte every 0.1 s: every read "makes progress"
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture()
def drip_url():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x.ckpt"
    finally:
        server.shutdown()
        server.server_close()


def test_download_has_an_overall_deadline_and_a_size_cap(drip_url):
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="deadline"):
        read_checkpoint(drip_url, timeout=5, deadline_s=1.0)
    assert time.perf_counter() - t0 < 4
    with pytest.raises(CheckpointError, match="larger than 3 bytes"):
        read_checkpoint(drip_url, timeout=5, max_download_bytes=3)


# ----------------------------------------------------------------------------- 4. one-line errors

def test_damaged_checkpoint_in_fit_is_one_paragraph_and_leaves_no_run_folder(tmp_path, capsys):
    ckpt = _lm_checkpoint(tmp_path / "lm.ckpt")
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", PYDOC, "--runs_root", str(tmp_path / "runs"), "--ckpt_path", str(ckpt)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "lm.ckpt" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert not (tmp_path / "runs" / "pydoc-lstm").exists()


def test_bad_setting_in_recipe_leaves_no_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", PYDOC, "--runs_root", str(tmp_path / "runs"), "--model.init_args.lr", "-1"])
    assert "lr" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "pydoc-lstm").exists()


def test_full_disk_names_the_path_and_no_space_left(tmp_path, monkeypatch):
    import hypernetworks.training as training

    real_save = torch.save

    def save_to_full_disk(obj, f, *a, **k):
        with open("/dev/full", "wb") as full:
            real_save(obj, full)

    if not Path("/dev/full").exists():
        pytest.skip("this system has no /dev/full, which the test uses to fill the disk")
    monkeypatch.setattr(training.torch, "save", save_to_full_disk)
    target = tmp_path / "ckpts" / "last.ckpt"
    with pytest.raises(OSError) as err:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(10**5)}}, target)
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    assert not list(target.parent.iterdir())  # the temporary file is gone
    from hypernetworks._errors import user_message

    assert user_message(err.value).startswith(f"no space left on device while writing {target}")


def test_damaged_data_file_is_one_paragraph_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """A PTB char file that is the word-level file (a real mix-up): the reader's error, one paragraph."""
    root = tmp_path / "data" / "ptb"
    root.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (root / f"ptb.char.{split}.txt").write_text("the cat sat on the mat\n")  # words, not characters
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(REPO / "configs/ptb-small-lstm.yaml"), "--runs_root", str(tmp_path / "runs"),
                 "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "ptb.char.train.txt" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 5
    assert not (tmp_path / "runs" / "ptb-small-lstm").exists()


def test_fifo_named_ckpt_is_refused_without_blocking(tmp_path):
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("this system cannot make a named pipe (os.mkfifo)")
    fifo = tmp_path / "x.ckpt"
    os.mkfifo(fifo)
    result: list = []

    def load():
        try:
            read_checkpoint(fifo)
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "read_checkpoint blocked on a FIFO"
    assert isinstance(result[0], CheckpointError) and "not a regular file" in str(result[0])
