"""The demo, sample and activity commands, and the two pictures (activity, saturation)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hypernetworks.cli import main as cli_main
from hypernetworks.tasks.language_model import LanguageModelTask
from hypernetworks.viz.activity import render_activity
from hypernetworks.viz.saturation import collect_states, plot_saturation


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    assert cli_main(["demo", "--quick", "--steps", "6", "--run-dir", str(run), "--no-progress"]) == 0
    return run


def test_demo_trains_both_and_writes_the_picture(demo_run, capsys):
    results = json.loads((demo_run / "results.json").read_text())
    assert [r["cell"] for r in results] == ["hyperlstm", "lstm"]
    for r in results:
        assert 0 < r["val_bpc"] < 8 and r["params"] > 0
    assert results[0]["params"] > results[1]["params"]  # the hypernetwork's extra weights
    html = (demo_run / "activity.html").read_text()
    assert "<script" not in html and "http" not in html.split("<body>")[1]  # self-contained
    assert html.count('class="c"') > 50 and "forget f" in html
    with Image.open(demo_run / "activity.png") as im:
        assert im.size[0] > 200 and im.size[1] > 50


def test_sample_command_is_deterministic(demo_run, capsys):
    ckpt = str(demo_run / "hyperlstm" / "checkpoints" / "last.ckpt")
    cli_main(["sample", ckpt, "--length", "30", "--seed", "5", "--prime", "The "])
    first = capsys.readouterr().out
    cli_main(["sample", ckpt, "--length", "30", "--seed", "5", "--prime", "The "])
    assert capsys.readouterr().out == first and first.startswith("The ") and len(first) == 4 + 30 + 1
    cli_main(["sample", ckpt, "--length", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "text" and len(out["intensity"]) == 5
    with pytest.raises(SystemExit, match="not found"):
        cli_main(["sample", str(demo_run / "missing.ckpt")])


def test_activity_command_reads_given_text(demo_run, tmp_path):
    ckpt = str(demo_run / "hyperlstm" / "checkpoints" / "last.ckpt")
    assert cli_main(["activity", ckpt, "--text", "print(x)\nreturn y", "--out", str(tmp_path)]) == 0
    html = (tmp_path / "activity.html").read_text()
    assert html.count('class="c"') == len("print(x)return y") and "<br>" in html
    assert (tmp_path / "activity.png").stat().st_size > 1000


def test_activity_picture_rejects_mismatched_input(tmp_path):
    with pytest.raises(ValueError, match="differ in length"):
        render_activity(["a", "b"], [[0.0] * 4], tmp_path)
    with pytest.raises(ValueError, match="4 values"):
        render_activity(["a"], [[0.0] * 3], tmp_path)


def test_activity_shading_follows_intensity(tmp_path):
    rows = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.0, 2.0], [0.5, 0.4, 0.0, 1.0]]
    html = render_activity(["a", "b", "c"], rows, tmp_path)[0].read_text()
    cell_c = html.split("<u>b</u>")[1]  # normalised per gate by the gate's peak in the passage
    assert ["0.500", "1.000", "0.000", "0.500"] == [s.split('"')[0] for s in cell_c.split("opacity:")[1:5]]


def test_saturation_histograms(tmp_path):
    torch.manual_seed(0)
    states = {}
    for cell in ("lstm", "ln-lstm", "hyperlstm"):
        task = LanguageModelTask(cell=cell, hidden_size=8, hyper_size=4, vocab=list("abc "))
        h, c = collect_states(task, "abc cab " * 5)
        assert h.shape == c.shape == (40 * 8,) and h.abs().max() <= 1
        states[cell] = (h, c)
    path = plot_saturation(states, tmp_path / "sat.png")
    with Image.open(path) as im:
        assert im.size[0] > 600


def test_saturation_table_shares_are_those_of_the_histograms(monkeypatch):
    """benchmarks/saturation_table.py: the shares of |h| > 0.95 and |c| > 5 of the states the picture
    plots, per checkpoint, with characters outside the vocabulary dropped."""
    import importlib.util
    from pathlib import Path

    import hypernetworks.training as training

    spec = importlib.util.spec_from_file_location(
        "saturation_table", Path(__file__).resolve().parents[1] / "benchmarks" / "saturation_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    tasks = {"a.ckpt": LanguageModelTask(cell="hyperlstm", hidden_size=8, hyper_size=4, vocab=list("abc "))}
    monkeypatch.setattr(training, "load_task", lambda path: tasks[path])
    (row,) = mod.shares(["a.ckpt"], "abc cab xyz " * 5)
    h, c = collect_states(tasks["a.ckpt"], "abc cab  " * 5)
    assert row["model"] == "hyperlstm 8" and row["values"] == h.numel()
    assert row["h_above_0.95"] == pytest.approx(float((h.abs() > 0.95).float().mean()))
    assert row["c_beyond_5"] == pytest.approx(float((c.abs() > 5).float().mean()))
