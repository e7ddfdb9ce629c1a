"""So2Sat LCZ42, CHAMMI and JUMP-CP readers on small files written here in the published formats,
including a truncated or corrupt file of each kind (clear errors naming the file)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from hypernetworks.data.images import DatasetFileError
from hypernetworks.data.chammi import (CHAMMI, CHAMMI_CHANNELS, CHAMMI_TASKS, CHAMMIDataModule, SubDatasetBatchSampler,
                                       collate_channels, fold_strip, in_split)
from hypernetworks.data.channel_utils import ChannelNormalize, channel_stats
from hypernetworks.data.jumpcp import JUMPCP, JUMPCP_CHANNELS, JUMPCP_METADATA, jumpcp_split
from hypernetworks.data.so2sat import SO2SAT_CHANNELS, SO2SAT_METADATA, So2SatLCZ42
from hypernetworks.tasks.chammi_metrics import chammi_benchmark
from hypernetworks.models.vit import ChannelAdaptiveViT
from hypernetworks.tasks.channels import ChannelClassifier, evaluate_chammi

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------- So2Sat


def _write_so2sat(path, n=6, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    sen1 = rng.normal(size=(n, 32, 32, 8))
    sen2 = rng.random((n, 32, 32, 10))
    labels = np.arange(n) % 17 if labels is None else np.asarray(labels)
    onehot = np.zeros((n, 17))
    onehot[np.arange(n), labels] = 1
    with h5py.File(path, "w") as f:  # float64 datasets, as published
        f["sen1"], f["sen2"], f["label"] = sen1, sen2, onehot
    return sen1, sen2, labels


def test_so2sat_reads_lazily_with_channel_selection(tmp_path):
    sen1, sen2, labels = _write_so2sat(tmp_path / "training.h5")
    ds = So2SatLCZ42(tmp_path, "train")
    assert len(ds) == 6 and ds.channels == SO2SAT_CHANNELS and ds._file is None  # nothing read yet
    x, y = ds[3]
    assert x.shape == (18, 32, 32) and x.dtype == torch.float32 and y == labels[3]
    np.testing.assert_allclose(x[:8].numpy(), sen1[3].transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(x[8:].numpy(), sen2[3].transpose(2, 0, 1), rtol=1e-6)
    # any subset in any order, S2 before S1 included
    pick = ["S2_B4", "S1_VV_real", "S2_B2"]
    x, _ = So2SatLCZ42(tmp_path, "train", channels=pick)[1]
    np.testing.assert_allclose(x.numpy(), np.stack([sen2[1, ..., 2], sen1[1, ..., 2], sen2[1, ..., 0]]), rtol=1e-6)
    assert list(ds.labels()) == list(labels)
    assert set(SO2SAT_METADATA) == set(SO2SAT_CHANNELS) and len({len(v) for v in SO2SAT_METADATA.values()}) == 1


def test_so2sat_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="testing.h5"):
        So2SatLCZ42(tmp_path, "test")
    _write_so2sat(tmp_path / "training.h5")
    raw = (tmp_path / "training.h5").read_bytes()
    (tmp_path / "validation.h5").write_bytes(raw[: len(raw) // 2])  # truncated download
    with pytest.raises(DatasetFileError, match="validation.h5"):
        So2SatLCZ42(tmp_path, "val")
    with h5py.File(tmp_path / "testing.h5", "w") as f:
        f["sen1"], f["sen2"], f["label"] = np.zeros((2, 32, 32, 8)), np.zeros((2, 32, 32, 9)), np.zeros((2, 17))
    with pytest.raises(DatasetFileError, match=r"testing.h5: shapes"):
        So2SatLCZ42(tmp_path, "test")
    with h5py.File(tmp_path / "testing.h5", "w") as f:
        f["sen1"], f["sen2"], f["label"] = np.zeros((2, 32, 32, 8)), np.zeros((2, 32, 32, 10)), np.zeros((2, 17))
    with pytest.raises(DatasetFileError, match="not one-hot"):
        So2SatLCZ42(tmp_path, "test")[0]
    with pytest.raises(ValueError, match="not So2Sat channels"):
        So2SatLCZ42(tmp_path, "train", channels=["B4"])
    with pytest.raises(ValueError, match="split"):
        So2SatLCZ42(tmp_path, "training")


def test_channel_normalize_and_stats(tmp_path):
    _write_so2sat(tmp_path / "training.h5", n=4)
    ds = So2SatLCZ42(tmp_path, "train", channels=["S2_B2", "S1_VH_real"])
    stats = channel_stats(ds, ds.channels)
    allx = torch.stack([ds[i][0] for i in range(4)]).double()
    assert stats["S2_B2"][0] == pytest.approx(float(allx[:, 0].mean()))
    assert stats["S1_VH_real"][1] == pytest.approx(float(allx[:, 1].std(unbiased=False)), rel=1e-6)
    norm = ChannelNormalize(stats, ["S1_VH_real"])  # looked up by name: any subset
    z = torch.stack([norm(ds[i][0][1:]) for i in range(4)])
    assert abs(float(z.mean())) < 1e-5 and float(z.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="no normalisation statistics"):
        ChannelNormalize(stats, ["S2_B3"])


# ---------------------------------------------------------------------------------- CHAMMI


def _write_chammi(root, sub, rows, h=8, cw=8, bits=8, seed=0):
    """``rows``: (split, label) per image. Images are PNG strips of the channels side by side."""
    rng = np.random.default_rng(seed)
    c = len(CHAMMI_CHANNELS[sub])
    (root / sub / "images").mkdir(parents=True, exist_ok=True)
    stacks = []
    with open(root / sub / "enriched_meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_path", "ID", "channel_width", "train_test_split", "Label"])
        for k, (split, label) in enumerate(rows):
            rel = f"{sub}/images/{sub}_{k}.png"
            top = 65535 if bits == 16 else 255
            chans = rng.integers(0, top + 1, size=(c, h, cw)).astype(np.uint16 if bits == 16 else np.uint8)
            strip = np.concatenate(list(chans), axis=1)  # (h, c * cw)
            Image.fromarray(strip).save(root / rel)
            stacks.append(chans)
            w.writerow([rel, f"{sub}_{k}", cw, split, label])
    return stacks


def test_fold_strip():
    chans = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    strip = np.concatenate(list(chans), axis=1)
    np.testing.assert_array_equal(fold_strip(strip, 5), chans)
    with pytest.raises(DatasetFileError, match="not a multiple"):
        fold_strip(strip, 4)
    with pytest.raises(DatasetFileError, match="expected 4"):
        fold_strip(strip, 5, 4)


def test_chammi_folds_strips_of_3_4_5_channels(tmp_path):
    allen = _write_chammi(tmp_path, "Allen", [("Train", "M0"), ("Task_one", "M0")])
    hpa = _write_chammi(tmp_path, "HPA", [("Train", "golgi"), ("Train", "er"), ("Task_one", "er"),
                                          ("Task_three", "nucleoplasm")], seed=1)
    cp = _write_chammi(tmp_path, "CP", [("Train", "BRD-1"), ("Task_two", "BRD-1")], bits=16, seed=2)
    ds = CHAMMI(tmp_path)
    assert ds.classes == ["Allen:M0", "CP:BRD-1", "HPA:er", "HPA:golgi"] and len(ds) == 4
    x, y, names = ds[0]
    assert x.shape == (3, 8, 8) and names == tuple(CHAMMI_CHANNELS["Allen"]) and y == 0
    np.testing.assert_allclose(x.numpy(), allen[0] / 255.0, rtol=1e-6)
    x, y, names = ds[2]  # second HPA Train image: 4 channels
    assert x.shape == (4, 8, 8) and ds.classes[y] == "HPA:er"
    np.testing.assert_allclose(x.numpy(), hpa[1] / 255.0, rtol=1e-6)
    x, _, names = ds[3]  # 16-bit CP strip: 5 channels
    assert x.shape == (5, 8, 8) and len(names) == 5
    np.testing.assert_allclose(x.numpy(), cp[0] / 65535.0, rtol=1e-6)
    # task splits: labels outside the training vocabulary (novel classes) are -1
    test = CHAMMI(tmp_path, ["HPA"], ["Task_one", "Task_three"], classes=ds.classes)
    assert [s[3] for s in test.samples] == [ds.classes.index("HPA:er"), -1]
    # batches of one sub-dataset each, collated with their channel names
    sampler = SubDatasetBatchSampler(ds.subsets(), batch_size=2, shuffle=True)
    for batch in sampler:
        x, y, names = collate_channels([ds[i] for i in batch])
        assert x.shape[1] == len(names) and len({ds.samples[i][0] for i in batch}) == 1
    with pytest.raises(ValueError, match="mixes channel sets"):
        collate_channels([ds[0], ds[1]])


def test_chammi_bad_files(tmp_path):
    _write_chammi(tmp_path, "HPA", [("Train", "er"), ("Train", "golgi")])
    with pytest.raises(FileNotFoundError, match="CP/enriched_meta.csv"):
        CHAMMI(tmp_path, ["CP"])
    png = tmp_path / "HPA" / "images" / "HPA_1.png"
    png.write_bytes(png.read_bytes()[:40])  # truncated image
    ds = CHAMMI(tmp_path, ["HPA"])
    with pytest.raises(DatasetFileError, match="HPA_1.png"):
        ds[1]
    Image.fromarray(np.zeros((8, 24), np.uint8)).save(png)  # a 3-channel strip where HPA has 4
    with pytest.raises(DatasetFileError, match="expected 4"):
        ds[1]
    meta = tmp_path / "HPA" / "enriched_meta.csv"
    meta.write_text("file_path,ID,train_test_split,Label\nHPA/images/HPA_0.png,0,Train,er\n")
    with pytest.raises(DatasetFileError, match=r"enriched_meta.csv: missing columns \['channel_width'\]"):
        CHAMMI(tmp_path, ["HPA"])
    meta.write_text("file_path,ID,channel_width,train_test_split,Label\nHPA/images/HPA_0.png,0,eight,Train,er\n")
    with pytest.raises(DatasetFileError, match="row 2"):
        CHAMMI(tmp_path, ["HPA"])


def test_chammi_training_and_per_sub_dataset_test(tmp_path):
    _write_chammi(tmp_path, "HPA", [("Train", "er"), ("Train", "golgi")] * 6 + [("Task_one", "er")] * 3)
    _write_chammi(tmp_path, "CP", [("Train", "a"), ("Train", "b")] * 6 + [("Task_one", "b")] * 2, seed=3)
    dm = CHAMMIDataModule(str(tmp_path), sub_datasets=["HPA", "CP"], img_size=8, batch_size=4, eval_batch_size=4,
                          val_fraction=0.2)
    hpa, cp = CHAMMI_CHANNELS["HPA"], CHAMMI_CHANNELS["CP"]
    task = ChannelClassifier(
        "hypernet-vit-tiny-p4", num_classes=4, eval_subsets=[hpa, cp, hpa[:2]],
        model_args=dict(channels=hpa + cp, num_classes=4, img_size=8, embed_dim=16, depth=1, num_heads=2))
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    m = trainer.test(task, datamodule=dm, verbose=False)[0]
    for key in ("test_acc", f"test_acc/{'+'.join(hpa)}", f"test_acc/{'+'.join(cp)}", f"test_acc/{'+'.join(hpa[:2])}"):
        assert 0.0 <= m[key] <= 1.0
    wrong = ChannelClassifier("hypernet-vit-tiny-p4", num_classes=5, model_args=dict(
        channels=hpa + cp, num_classes=5, img_size=8, embed_dim=16, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="the data has 4 classes but num_classes=5"):
        Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu").fit(wrong, datamodule=dm)


def _slow_chammi(features, rows, leave):
    """MorphEm's evaluation written out with plain loops: 1-NN (Euclidean) on Train, macro-F1 over
    the labels present; a leave-out task fits Train + the task's other groups for each group."""
    labels = list(dict.fromkeys(r["Label"] for r in rows))
    y = [labels.index(r["Label"]) for r in rows]

    def nn1(fit, query):
        out = []
        for q in query:
            d = [float(((features[q] - features[f]) ** 2).sum()) for f in fit]
            out.append(y[fit[d.index(min(d))]])
        return out

    def f1(pred, truth):
        scores = []
        for c in sorted(set(truth)):
            tp = sum(p == c and t == c for p, t in zip(pred, truth))
            fp = sum(p == c and t != c for p, t in zip(pred, truth))
            fn = sum(p != c and t == c for p, t in zip(pred, truth))
            prec = tp / (tp + fp) if tp + fp else 0.0
            rec = tp / (tp + fn) if tp + fn else 0.0
            scores.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        return sum(scores) / len(scores)

    train = [i for i, r in enumerate(rows) if r["train_test_split"] == "Train"]
    out = {}
    for task in dict.fromkeys(r["train_test_split"] for r in rows if r["train_test_split"] != "Train"):
        member = [i for i, r in enumerate(rows) if in_split(r, task)]
        if leave and task == leave[0]:
            pred, truth = [], []
            for g in dict.fromkeys(rows[i][leave[1]] for i in member):
                held = [i for i in member if rows[i][leave[1]] == g]
                pred += nn1(train + [i for i in member if rows[i][leave[1]] != g], held)
                truth += [y[i] for i in held]
        else:
            pred, truth = nn1(train, member), [y[i] for i in member]
        out[task] = (sum(p == t for p, t in zip(pred, truth)) / len(truth), f1(pred, truth), len(truth))
    return out


def test_chammi_benchmark_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    splits = ["Train"] * 12 + ["Task_one"] * 5 + ["Task_two"] * 4 + ["Task_three"] * 6
    rows = []
    for k, split in enumerate(splits):
        row = {"train_test_split": split, "Label": ["er", "golgi", "nucleoli"][k % 3],
               "cell_type": ["A", "B"][k % 2], "Task_one": "", "Task_two": ""}
        rows.append(row)
    rows[14]["Task_two"] = "True"  # a Task_one row that also serves Task_two (the CSV's task columns)
    rows[13]["Task_one"], rows[17]["Task_two"] = "True", "False"
    feats = torch.randn(len(rows), 5, generator=g)
    feats[torch.arange(len(rows)), torch.tensor([k % 3 for k in range(len(rows))])] += 1.5
    got = chammi_benchmark(feats, rows, "HPA")
    ref = _slow_chammi(feats, rows, ("Task_three", "cell_type"))
    assert list(got) == list(ref) == ["Task_one", "Task_two", "Task_three"]
    for task, (acc, f1, n) in ref.items():
        assert got[task]["n"] == n
        assert got[task]["accuracy"] == pytest.approx(acc) and got[task]["f1_macro"] == pytest.approx(f1)
    with pytest.raises(ValueError, match="feature rows"):
        chammi_benchmark(feats[:3], rows, "HPA")


def test_evaluate_chammi_runs_a_model_over_every_image(tmp_path):
    _write_chammi(tmp_path, "Allen", [("Train", "M0"), ("Train", "M1"), ("Task_one", "M0"), ("Task_two", "M1")])
    model = ChannelAdaptiveViT(CHAMMI_CHANNELS["Allen"], num_classes=2, img_size=8, patch_size=4, embed_dim=8,
                               depth=1, num_heads=2)
    scores = evaluate_chammi(model, str(tmp_path), ["Allen"], img_size=8, batch_size=3)
    assert set(scores["Allen"]) == {"Task_one", "Task_two"} and scores["Allen"]["Task_one"]["n"] == 1


# ---------------------------------------------------------------------------------- JUMP-CP


def _write_jump(root, n=20, platemap_as_parquet=False, hwc=False):
    root.mkdir(parents=True, exist_ok=True)
    (root / "BR00116991").mkdir()
    (root / "platemap_and_metadata").mkdir()
    rng = np.random.default_rng(0)
    wells = ["A01", "A02", "B01", "B02", "C05"]  # C05 is not in the plate map: unlabelled
    rows, images = [], []
    for k in range(n):
        well = wells[k % len(wells)]
        name = f"BR00116991_{well}_1_{k}.npy"
        img = rng.integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
        np.save(root / "BR00116991" / name, img.transpose(1, 2, 0) if hwc else img)
        images.append(img)
        rows.append((f"s3://insitro-research-2023-context-vit/jumpcp/BR00116991/{name}", f"id{k}", well))
    pq.write_table(pa.table({"path": [r[0] for r in rows], "ID": [r[1] for r in rows],
                             "well_loc": [r[2] for r in rows]}), root / "BR00116991.pq")
    platemap = [("plate_map_name", "well_position", "broad_sample", "solvent"),
                ("JUMP-Target-1_compound_platemap", "A01", "BRD-X", "DMSO"),
                ("JUMP-Target-1_compound_platemap", "A02", "", "DMSO"),
                ("JUMP-Target-1_compound_platemap", "B01", "BRD-Y", "DMSO"),
                ("JUMP-Target-1_compound_platemap", "B02", "BRD-Z", "DMSO")]
    metadata = [("broad_sample", "InChIKey", "pert_iname", "pubchem_cid", "target", "pert_type", "control_type"),
                ("BRD-Y", "K1", "drug-y", "1", "EGFR", "trt", ""),
                ("BRD-X", "K2", "drug-x", "2", "HDAC1", "trt", ""),
                ("BRD-Z", "K3", "drug-z", "3", "EGFR", "trt", "")]
    for name, table in (("JUMP-Target-1_compound_platemap.tsv", platemap),
                        ("JUMP-Target-1_compound_metadata.tsv", metadata)):
        path = root / "platemap_and_metadata" / name
        if platemap_as_parquet:
            pq.write_table(pa.table({c: [r[i] for r in table[1:]] for i, c in enumerate(table[0])}), path)
        else:
            path.write_text("\n".join("\t".join(r) for r in table) + "\n")
    return rows, images


@pytest.mark.parametrize("as_parquet,hwc", [(False, False), (True, True)], ids=["tsv-chw", "parquet-hwc"])
def test_jumpcp_index_images_and_plate_map_labels(tmp_path, as_parquet, hwc):
    rows, images = _write_jump(tmp_path / "jumpcp", platemap_as_parquet=as_parquet, hwc=hwc)
    ds = JUMPCP(tmp_path / "jumpcp", split="all")
    assert ds.classes == ["control", "EGFR", "HDAC1"]  # targets in metadata order; no target -> control
    assert len(ds) == 16  # the 4 images of the unlabelled well C05 are left out
    expect = {"A01": 2, "A02": 0, "B01": 1, "B02": 1}
    for k, (path, label) in enumerate(ds.samples):
        assert label == expect[path.name.split("_")[1]]
    x, y = ds[0]
    assert x.shape == (8, 16, 16) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), images[0] / 255.0, rtol=1e-6)
    sub = JUMPCP(tmp_path / "jumpcp", split="all", channels=["HighZBF", "AGP"])
    np.testing.assert_allclose(sub[0][0].numpy(), images[0][[5, 1]] / 255.0, rtol=1e-6)
    # ChannelViT's split: a seed-0 permutation cut 60/20/20, disjoint and complete
    parts = [set(jumpcp_split(20, s).tolist()) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [12, 4, 4] and set.union(*parts) == set(range(20))
    assert list(jumpcp_split(20, "train")) == list(np.random.RandomState(0).permutation(20)[:12])
    # the stored order as ChannelViT's dataset config names it
    assert JUMPCP_CHANNELS == ["Mito", "AGP", "RNA", "ER", "DNA", "HighZBF", "LowZBF", "Brightfield"]


def test_jumpcp_bad_files(tmp_path):
    root = tmp_path / "jumpcp"
    rows, _ = _write_jump(root)
    ds = JUMPCP(root, split="all")
    bad = ds.samples[0][0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated .npy
    with pytest.raises(DatasetFileError, match=bad.name):
        ds[0]
    np.save(bad, np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(DatasetFileError, match="not an 8-channel image"):
        ds[0]
    index = root / "BR00116991.pq"
    index.write_bytes(index.read_bytes()[:-30])  # truncated parquet (footer gone)
    with pytest.raises(DatasetFileError, match="BR00116991.pq"):
        JUMPCP(root)
    with pytest.raises(FileNotFoundError, match="BR00117000.pq"):
        JUMPCP(root, plate="BR00117000")
    (root / "platemap_and_metadata" / "JUMP-Target-1_compound_metadata.tsv").write_text("broad_sample\tname\nX\ty\n")
    pq.write_table(pa.table({"path": [r[0] for r in rows], "ID": [r[1] for r in rows],
                             "well_loc": [r[2] for r in rows]}), index)
    with pytest.raises(DatasetFileError, match=r"compound_metadata.tsv: missing columns \['target'\]"):
        JUMPCP(root)


# ------------------------------------------------- CHAMMI's benchmark through `hypernetworks test`


def _write_chammi_tasks(root, sub, rows, group_col, seed=0, h=8, cw=8):
    """One sub-dataset as CHAMMI publishes it: ``enriched_meta.csv`` with ``train_test_split``, the
    boolean task columns (True/False, as pandas writes them; MorphEm selects a task's rows by its
    column), the leave-out group column (HPA ``cell_type``, CP ``Plate``) and 8-bit PNG strips.
    ``rows``: (split, label, group) per image."""
    rng = np.random.default_rng(seed)
    c = len(CHAMMI_CHANNELS[sub])
    tasks = CHAMMI_TASKS[sub]
    (root / sub / "images").mkdir(parents=True, exist_ok=True)
    with open(root / sub / "enriched_meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_path", "ID", "channel_width", "train_test_split", "Label", group_col, *tasks])
        for k, (split, label, group) in enumerate(rows):
            rel = f"{sub}/images/{sub}_{k}.png"
            chans = rng.integers(0, 256, size=(c, h, cw)).astype(np.uint8)
            Image.fromarray(np.concatenate(list(chans), axis=1)).save(root / rel)
            w.writerow([rel, f"{sub}_{k}", cw, split, label, group, *[str(split == t) for t in tasks]])


def _write_chammi_benchmark(root):
    """All three sub-datasets with every task split; novel classes (absent from Train) in HPA
    Task_three (held out by cell type) and CP Task_four (held out by plate)."""
    train = lambda labels, g: [("Train", lab, g) for lab in labels * 3]  # noqa: E731
    _write_chammi_tasks(root, "Allen", train(["M0", "M1"], "")
                        + [(t, lab, "") for t in ("Task_one", "Task_two") for lab in ("M0", "M1")], "Structure")
    _write_chammi_tasks(root, "HPA", train(["er", "golgi"], "U2OS")
                        + [(t, lab, "U2OS") for t in ("Task_one", "Task_two") for lab in ("er", "golgi")]
                        + [("Task_three", lab, ct) for ct in ("A-431", "HEK293") for lab in ("nucleoli", "actin")],
                        "cell_type", seed=1)
    _write_chammi_tasks(root, "CP", train(["BRD-a", "BRD-b"], "P0")
                        + [(t, lab, "P0") for t in ("Task_one", "Task_two", "Task_three") for lab in ("BRD-a", "BRD-b")]
                        + [("Task_four", lab, pl) for pl in ("P1", "P2") for lab in ("BRD-c", "BRD-d")],
                        "Plate", seed=2)


def test_chammi_benchmark_through_hypernetworks_test(tmp_path, monkeypatch):
    """The CHAMMI recipe, shrunk, through the CLI: fit, then `test` on every task split, novel
    classes included. No novel class (label -1) and no Train reference row reaches the
    classification loss; the 1-NN macro-F1 per task and the aggregate are logged and equal those
    computed from the same model's features by the benchmark's own steps."""
    from hypernetworks.tasks.chammi_metrics import chammi_aggregate
    from hypernetworks.training import run_cli

    root = tmp_path / "chammi"
    _write_chammi_benchmark(root)
    targets = []
    real_ce = torch.nn.functional.cross_entropy

    def checked_ce(logits, target, *a, **kw):
        targets.append(target.detach().clone())
        return real_ce(logits, target, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", checked_ce)
    channels = [c for s in ("Allen", "HPA", "CP") for c in CHAMMI_CHANNELS[s]]
    args = dict(channels=channels, num_classes=6, img_size=8, embed_dim=16, depth=1, num_heads=2,
                embedding_size=8, hidden_size=8)
    common = ["--config", str(REPO / "configs/chammi-hypernet-vit-s16.yaml"), "--runs_root", str(tmp_path / "runs"),
              "--run_name", "r", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--model.init_args.model", "published-hypernet-vit-tiny-p4", "--model.init_args.num_classes", "6",
              "--model.init_args.model_args", json.dumps(args), "--data.init_args.root", str(root),
              "--data.init_args.img_size", "8", "--data.init_args.batch_size", "4",
              "--data.init_args.eval_batch_size", "5", "--data.init_args.num_workers", "0",
              "--data.init_args.val_fraction", "0.2"]
    run_cli(["fit", *common, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
             "--trainer.limit_val_batches", "1"])
    targets.clear()
    cli = run_cli(["test", *common, "--ckpt_path", str(tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt")])
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert targets and all(bool((t >= 0).all()) for t in targets)  # the loss saw known classes only
    n_loss = sum(len(t) for t in targets)
    ds = cli.datamodule.test_set
    known_task_rows = [i for i in range(len(ds)) if ds.in_task[i] and ds.samples[i][3] >= 0]
    assert n_loss == len(known_task_rows) == 4 + 4 + 6  # the task rows of classes seen in training
    assert len(ds) == 10 + 14 + 16 and sum(s[3] < 0 for s in ds.samples) == 8  # Train rows too; 8 novel
    # the head's accuracy over exactly those rows
    model = cli.model.model.eval()
    with torch.no_grad():
        hits = [int(model(ds[i][0][None], list(ds[i][2])).argmax(1)) == ds.samples[i][3] for i in known_task_rows]
    assert m["test_acc"] == pytest.approx(sum(hits) / len(hits))
    # CHAMMI's scores: the same as the benchmark's steps on the same model's features
    ref = evaluate_chammi(model, str(root), img_size=8, batch_size=7)
    for sub, tasks in CHAMMI_TASKS.items():
        assert set(ref[sub]) == set(tasks)
        for task in tasks:
            assert m[f"chammi/{sub}/{task}/f1_macro"] == pytest.approx(ref[sub][task]["f1_macro"], abs=1e-6)
            assert m[f"chammi/{sub}/{task}/accuracy"] == pytest.approx(ref[sub][task]["accuracy"], abs=1e-6)
    agg = chammi_aggregate(ref)
    assert set(agg) >= {"score_f1", "score_acc", "HPA/ood_f1", "HPA/id_f1", "CP/ood_f1", "Allen/ood_f1"}
    for key, value in agg.items():
        assert m[f"chammi/{key}"] == pytest.approx(value, abs=1e-6)
    rest = [ref[s][t]["f1_macro"] for s in ("Allen", "HPA", "CP") for t in CHAMMI_TASKS[s]][1:]
    assert agg["score_f1"] == pytest.approx(sum(rest) / 8)  # the published code: every task but WTC Task_one
    assert agg["HPA/ood_f1"] == pytest.approx((ref["HPA"]["Task_two"]["f1_macro"] + ref["HPA"]["Task_three"]["f1_macro"]) / 2)
    # benchmarks/chammi_benchmark.py prints and writes the same numbers from the checkpoint
    import importlib.util

    spec = importlib.util.spec_from_file_location("chammi_benchmark_script", REPO / "benchmarks/chammi_benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "scores.json"
    assert script.main([str(tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"), "--root", str(root),
                        "--img-size", "8", "--batch-size", "7", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["aggregate"]["score_f1"] == pytest.approx(m["chammi/score_f1"], abs=1e-6)
    assert saved["tasks"]["CP"]["Task_four"]["f1_macro"] == pytest.approx(m["chammi/CP/Task_four/f1_macro"], abs=1e-6)


def test_chammi_single_task_split_and_head_only_test(tmp_path):
    _write_chammi_benchmark(tmp_path)
    dm = CHAMMIDataModule(str(tmp_path), sub_datasets=["HPA"], test_split="Task_three", img_size=8)
    dm.setup()
    assert dm.test_tasks == ["Task_three"] and dm.test_set.tasks == ["Task_three"]
    assert [dm.test_set.in_task[i] for i in range(len(dm.test_set))] == [False] * 6 + [True] * 4
    x, y, names, info = next(iter(dm.test_dataloader()))
    assert info.shape == (len(y), 2) and info[:, 0].tolist() == list(range(len(y)))
    plain = CHAMMIDataModule(str(tmp_path), sub_datasets=["HPA"], test_split=["Task_one", "Task_two"], benchmark=False)
    plain.setup()
    assert len(plain.test_set) == 4 and len(next(iter(plain.test_dataloader()))) == 3
    with pytest.raises(ValueError, match="test_split"):
        CHAMMIDataModule(str(tmp_path), test_split="Task_five")
    # features of only part of the test set (limit_test_batches, a sharded test): a warning, no scores
    from hypernetworks.tasks.channels import chammi_test_scores

    with pytest.warns(UserWarning, match="every test sample"):
        assert chammi_test_scores([(info[:3, 0], torch.randn(3, 4))], dm.test_set) == {}
    full = [(torch.arange(len(dm.test_set)), torch.randn(len(dm.test_set), 4))]
    assert list(chammi_test_scores(full, dm.test_set)) == ["HPA"]
    assert list(chammi_test_scores(full, dm.test_set)["HPA"]) == ["Task_three"]


def test_old_module_names_still_resolve():
    """Recipes and checkpoints written before the split name hypernetworks.data.multichannel.*:
    the data modules are still defined there (the checkpoint loader builds only classes defined in
    the module it names), as subclasses of the new ones."""
    from hypernetworks.checkpoints import resolve_trusted_class
    from hypernetworks.data import chammi, jumpcp, so2sat

    for new in (chammi.CHAMMIDataModule, jumpcp.JUMPCPDataModule, so2sat.So2SatDataModule):
        old = resolve_trusted_class(f"hypernetworks.data.multichannel.{new.__name__}")
        assert issubclass(old, new) and old is not new
        assert resolve_trusted_class(f"{new.__module__}.{new.__name__}") is new
    from hypernetworks.data import multichannel

    assert multichannel.CHAMMI is chammi.CHAMMI and multichannel.JUMPCP is jumpcp.JUMPCP
    assert multichannel.chammi_benchmark is chammi_benchmark
