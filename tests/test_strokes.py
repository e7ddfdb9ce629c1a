"""IAM-OnDB readers, preprocessing, split and DataModule (hypernetworks.data.strokes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hypernetworks.data.strokes import (IAMOnDBDataModule, StrokeDataError, StrokeLines, collate_strokes,
                                        form_of, load_npz, offset_stats, prepare_line, read_xml, save_npz,
                                        split_of)
from tests.conftest import require_file

NPZ = "iam_ondb/iam_ondb_linestrokes.npz"


def _write_line_xml(path: Path, strokes: list[np.ndarray]) -> None:
    """A file in the lineStrokes XML layout (WhiteboardCaptureSession/StrokeSet/Stroke/Point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = []
    for k, s in enumerate(strokes):
        pts = "".join(f'<Point x="{x}" y="{y}" time="{1000 + k + 0.01 * j:.2f}"/>' for j, (x, y) in enumerate(s))
        body.append(f'<Stroke colour="black" start_time="{k}" end_time="{k + 1}">{pts}</Stroke>')
    path.write_text(
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<WhiteboardCaptureSession><WhiteboardDescription>'
        '<SensorLocation corner="top_left"/><DiagonallyOppositeCoords x="6000" y="2000"/>'
        '</WhiteboardDescription><StrokeSet>' + "".join(body) + "</StrokeSet></WhiteboardCaptureSession>")


def _make_db(root: Path, forms: dict[str, int], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random lines for the given forms (form -> number of lines), plus their ascii transcriptions."""
    rng = np.random.default_rng(seed)
    truth = {}
    for form, n in forms.items():
        writer, page = form[:3], form[:7]
        csr = []
        for j in range(1, n + 1):
            line_id = f"{form}-{j:02d}"
            strokes = [rng.integers(0, 3000, size=(int(rng.integers(2, 9)), 2)) for _ in range(int(rng.integers(1, 4)))]
            _write_line_xml(root / "lineStrokes" / writer / page / f"{line_id}.xml", strokes)
            truth[line_id] = strokes
            csr.append(f"text of {line_id}")
        txt = root / "ascii" / writer / page / f"{form}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("Name: x\n\nOCR:\n\nsomething\n\nCSR:\n\n" + "\n".join(csr) + "\n")
    return truth


def test_xml_reader_round_trip(tmp_path):
    truth = _make_db(tmp_path, {"a01-000u": 3, "b02-011x": 2})
    lines = read_xml(tmp_path)
    assert sorted(map(str, lines.line_ids)) == sorted(truth)
    assert not lines.malformed
    for i, line_id in enumerate(map(str, lines.line_ids)):
        strokes = truth[line_id]
        absolute = lines.absolute(i)  # offsets cumulate back to absolute coordinates
        np.testing.assert_array_equal(absolute[:, :2], np.concatenate(strokes))
        pen = np.concatenate([[0] * (len(s) - 1) + [1] for s in strokes])
        np.testing.assert_array_equal(absolute[:, 2], pen)
        assert str(lines.texts[i]) == f"text of {line_id}"
    # and the npz layout written from it reads back identically
    save_npz(lines, tmp_path / "x.npz")
    again = load_npz(tmp_path / "x.npz")
    np.testing.assert_array_equal(again.strokes, lines.strokes)
    np.testing.assert_array_equal(again.line_offsets, lines.line_offsets)
    assert list(again.line_ids) == list(lines.line_ids)


def test_xml_malformed_counted_not_silently_skipped(tmp_path):
    _make_db(tmp_path, {"a01-000u": 2})
    bad = tmp_path / "lineStrokes" / "a01" / "a01-000" / "a01-000u-09.xml"
    bad.write_text("<WhiteboardCaptureSession><StrokeSet><Stroke><Point x='1'/>")  # truncated
    empty = tmp_path / "lineStrokes" / "a01" / "a01-000" / "a01-000u-08.xml"
    empty.write_text("<WhiteboardCaptureSession><StrokeSet></StrokeSet></WhiteboardCaptureSession>")
    lines = read_xml(tmp_path)
    assert len(lines) == 2
    assert set(lines.malformed) == {str(bad), str(empty)}
    with pytest.raises(StrokeDataError, match="a01-000u-0[89].xml"):
        read_xml(tmp_path, strict=True)
    dm = IAMOnDBDataModule(xml_root=str(tmp_path), val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert dm.report["malformed"] == 2 and dm.report["train_lines"] == 2


def test_missing_and_corrupt_npz_errors_name_the_file(tmp_path):
    with pytest.raises(StrokeDataError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(StrokeDataError, match="garbage.npz"):
        load_npz(garbage)
    strokes = np.zeros((5, 3), np.int16)
    ids, texts = np.array(["a-1", "a-2"]), np.array(["", ""])
    np.savez(tmp_path / "nokey.npz", strokes=strokes, line_ids=ids, texts=texts)
    with pytest.raises(StrokeDataError, match=r"nokey.npz.*line_offsets"):
        load_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badoff.npz", strokes=strokes, line_offsets=np.array([0, 3, 9]), line_ids=ids, texts=texts)
    with pytest.raises(StrokeDataError, match=r"badoff.npz.*line_offsets"):
        load_npz(tmp_path / "badoff.npz")
    np.savez(tmp_path / "badids.npz", strokes=strokes, line_offsets=np.array([0, 3, 5]), line_ids=ids[:1], texts=texts)
    with pytest.raises(StrokeDataError, match=r"badids.npz.*line_ids"):
        load_npz(tmp_path / "badids.npz")
    # a one-point line is reported as malformed, not dropped silently
    np.savez(tmp_path / "short.npz", strokes=strokes, line_offsets=np.array([0, 1, 5]), line_ids=ids, texts=texts)
    assert list(load_npz(tmp_path / "short.npz").malformed) == ["a-1"]


def test_real_npz_split_holds_out_whole_forms(shared_data):
    lines = load_npz(require_file(shared_data / NPZ))
    assert len(lines) == 12195 and not lines.malformed
    forms = np.array(lines.form_ids())
    split = np.array([split_of(f) for f in forms])
    sets = {s: set(forms[split == s]) for s in ("train", "val", "test")}
    assert sets["train"].isdisjoint(sets["val"]) and sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert 0.05 < np.mean(split == "val") < 0.15 and 0.05 < np.mean(split == "test") < 0.15
    # the first line starts at its absolute whiteboard position and its pen lifts at the end
    first = lines.absolute(0)
    assert (first[:, :2] > 0).all() and first[-1, 2] == 1
    assert form_of("a01-000u-01") == "a01-000u"


def test_split_is_deterministic_and_validates():
    assert [split_of(f"f{i}") for i in range(50)] == [split_of(f"f{i}") for i in range(50)]
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("x", 0.6, 0.5)


def test_preprocessing_clip_stats_and_augmentation(tmp_path):
    _make_db(tmp_path, {f"a{k:02d}-000u": 4 for k in range(12)}, seed=1)
    dm = IAMOnDBDataModule(xml_root=str(tmp_path), batch_size=4, val_fraction=0.3, test_fraction=0.0, clip=500.0,
                           max_len=5)
    dm.setup()
    train, val = dm._splits["train"], dm._splits["val"]
    assert train and val
    assert all(np.abs(x[:, :2]).max() <= 500 and (x[0, :2] == 0).all() for x in train + val)
    mean, std = offset_stats(train)  # statistics come from the training split only
    np.testing.assert_allclose(dm.mean, mean)
    np.testing.assert_allclose(dm.std, std)
    assert not np.allclose(offset_stats(train + val)[0], mean)
    tr, va = dm.dataset("train"), dm.dataset("val")
    assert len(tr[0]) <= 6  # max_len prediction steps + the start row
    torch.manual_seed(0)
    assert not torch.equal(tr[0], tr[0])  # +-10% random scaling on training lines
    assert torch.equal(va[0], va[0])  # none on validation lines
    expect = (torch.from_numpy(val[0][: 6, :2]) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(va[0][1:, :2], expect[1:])
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == batch["targets"].shape and batch["inputs"].shape[-1] == 3
    assert batch["mask"].sum() == batch["lengths"].sum()


def test_collate_pads_and_masks():
    a, b = torch.arange(12.0).view(4, 3), torch.ones(2, 3)
    out = collate_strokes([a, b])
    assert out["inputs"].shape == (2, 3, 3)
    assert out["mask"].tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(out["targets"][0], a[1:])
    torch.testing.assert_close(out["inputs"][1, 0], b[0])
    with pytest.raises(ValueError, match="2 points"):
        collate_strokes([torch.ones(1, 3)])


def test_prepare_line_and_bad_arguments():
    line = np.array([[1000, 900, 0], [5000, -10, 0], [3, 4, 1]], np.int16)
    out = prepare_line(line, clip=1000.0)
    assert out.dtype == np.float32 and out[0, :2].tolist() == [0, 0] and out[1, 0] == 1000
    with pytest.raises(ValueError, match="batch_size"):
        IAMOnDBDataModule(batch_size=0)
    with pytest.raises(ValueError, match="max_lines"):
        IAMOnDBDataModule(max_lines=0)
    assert isinstance(StrokeLines(line, np.array([0, 3]), np.array(["a-1"]), np.array([""])).absolute(0), np.ndarray)


def test_real_normalisation_statistics_are_the_documented_ones(shared_data):
    """docs/handwriting.md quotes the training split's offset statistics (dx mean 8.18, std 41.6; dy
    mean 0.12, std 37.0), the log-loss offset they imply (7.34 nats per point) and the share of
    offsets the clip at +-1000 changes (0.01%)."""
    dm = IAMOnDBDataModule(path=str(require_file(shared_data / NPZ)))
    dm.setup()
    np.testing.assert_allclose(dm.mean, [8.18, 0.12], atol=0.005)
    np.testing.assert_allclose(dm.std, [41.6, 37.0], atol=0.05)
    assert round(float(np.log(dm.std[0] * dm.std[1])), 2) == 7.34  # the log-loss offset of normalising
    lines = load_npz(require_file(shared_data / NPZ))
    raw = np.concatenate([np.diff(lines.absolute(i)[:, :2], axis=0) for i in range(len(lines))])
    assert round(100 * float(np.mean((np.abs(raw) > 1000).any(axis=1))), 2) == 0.01  # of (dx, dy) offsets
