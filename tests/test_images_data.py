"""MNIST / CIFAR-10 readers on the real files in ../shared/data and on deliberately broken copies."""
from __future__ import annotations

import gzip
import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_file
from hypernetworks.data import images
from hypernetworks.data.images import (CIFAR10, MNIST, DatasetFileError, MNISTDataModule, RandomCrop,
                                       RandomHorizontalFlip, read_cifar10_jpeg_tar, read_idx)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir(shared_data):
    d = shared_data / "mnist"
    require_file(d / "train-images-idx3-ubyte.gz")
    return d


def test_mnist_real_files(mnist_dir):
    train, test = MNIST(mnist_dir, train=True), MNIST(mnist_dir, train=False)
    assert train.data.shape == (60000, 1, 28, 28) and train.data.dtype == torch.uint8
    assert test.data.shape == (10000, 1, 28, 28)
    assert train.targets[:5].tolist() == [5, 0, 4, 1, 9] and test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(train.targets).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.targets).tolist() == MNIST_TEST_COUNTS
    assert abs(train.data.float().mean().item() / 255 - 0.1307) < 1e-3
    img, label = test[0]
    assert img.shape == (1, 28, 28) and label == 7


def _copy_mnist(src, dst, names=("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
    dst.mkdir()
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def test_mnist_truncated_gzip_names_the_file(mnist_dir, tmp_path):
    d = _copy_mnist(mnist_dir, tmp_path / "m")
    f = d / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetFileError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        MNIST(d, train=False)


def test_mnist_corrupt_and_missing_files(mnist_dir, tmp_path):
    d = _copy_mnist(mnist_dir, tmp_path / "m")
    labels = gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    raw = d / "t10k-labels-idx1-ubyte"  # uncompressed files are read too
    raw.write_bytes(labels[:-10])  # short body
    with pytest.raises(DatasetFileError, match="t10k-labels-idx1-ubyte: .*needs"):
        read_idx(raw)
    raw.write_bytes(b"\x12\x34" + labels[2:])  # bad magic
    with pytest.raises(DatasetFileError, match="bad magic"):
        MNIST(d, train=False)
    raw.write_bytes(labels[:8] + bytes([12]) + labels[9:])  # label out of range
    with pytest.raises(DatasetFileError, match="out of range"):
        MNIST(d, train=False)
    raw.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        MNIST(d, train=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        MNIST(d, train=True)
    # header and body that disagree: fewer labels than images
    raw.write_bytes(labels[:4] + (100).to_bytes(4, "big") + labels[8:108])
    with pytest.raises(DatasetFileError, match="do not match"):
        MNIST(d, train=False)


def test_mnist_datamodule_split_and_transforms(mnist_dir):
    dm = MNISTDataModule(root=str(mnist_dir), batch_size=64, val_size=1000)
    dm.setup("fit")
    assert len(dm.train_set) == 59000 and len(dm.val_set) == 1000
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)
    xv, _ = next(iter(dm.val_dataloader()))
    assert abs(xv.mean().item()) < 0.2 and abs(xv.std().item() - 1) < 0.2  # normalised
    assert all(torch.equal(dm.val_set[0][0], dm.val_set[0][0]) for _ in range(5))  # no augmentation
    assert not all(torch.equal(dm.train_set[0][0], dm.train_set[0][0]) for _ in range(20))  # augmented
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(root=str(mnist_dir), val_size=-1)


def test_random_crop_is_a_shift_of_the_zero_padded_image():
    torch.manual_seed(0)
    x = torch.arange(1, 1 + 28 * 28, dtype=torch.float32).view(1, 28, 28)
    crop = RandomCrop(28, padding=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for _ in range(60):
        y = crop(x)
        assert y.shape == (1, 28, 28)
        hits = [(i, j) for i in range(3) for j in range(3) if torch.equal(padded[:, i:i + 28, j:j + 28], y)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 9  # all shifts of pad-30 / crop-28 occur
    flips = {torch.equal(RandomHorizontalFlip()(x), x.flip(-1)) for _ in range(40)}
    assert flips == {True, False}
    with pytest.raises(ValueError, match="smaller"):
        RandomCrop(40)(x)


# ----------------------------------------------------------------------------------- CIFAR-10

@pytest.fixture(scope="module")
def cifar_tar(shared_data):
    return require_file(shared_data / "cifar10" / "cifar10_jpg.tar.gz")


def test_cifar10_jpeg_tarball_real_file_few_members(cifar_tar, tmp_path):
    ds = CIFAR10(cifar_tar.parent, train=False, limit_per_class=2, cache_dir=tmp_path)
    assert ds.data.shape == (20, 3, 32, 32) and ds.data.dtype == torch.uint8
    assert ds.targets.tolist() == [c for c in range(10) for _ in range(2)]
    assert 40 < ds.data.float().mean().item() < 200  # real pictures, not blank
    assert not list(tmp_path.iterdir())  # partial reads are not cached


def _first_real_jpeg(tar_path) -> bytes:
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                return tar.extractfile(m).read()
    raise AssertionError("no JPEG in the tarball")


def _make_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_corrupt_tarball_copies(cifar_tar, tmp_path):
    truncated = tmp_path / "cut" / "cifar10_jpg.tar.gz"
    truncated.parent.mkdir()
    with open(cifar_tar, "rb") as f:
        truncated.write_bytes(f.read(300_000))
    with pytest.raises(DatasetFileError, match="cut/cifar10_jpg.tar.gz.*truncated or corrupt"):
        CIFAR10(truncated.parent, train=True, limit_per_class=100, cache_dir=tmp_path / "cache")

    jpeg = _first_real_jpeg(cifar_tar)
    bad = _make_tar(tmp_path / "bad.tar.gz", {"test/airplane/0000.jpg": jpeg, "test/bird/0000.jpg": jpeg[:40]})
    with pytest.raises(DatasetFileError, match="test/bird/0000.jpg is not a decodable image"):
        read_cifar10_jpeg_tar(bad, train=False)
    odd = _make_tar(tmp_path / "odd.tar.gz", {"test/zebra/0000.jpg": jpeg})
    with pytest.raises(DatasetFileError, match="unknown class 'zebra'"):
        read_cifar10_jpeg_tar(odd, train=False)
    few = _make_tar(tmp_path / "few.tar.gz", {"test/airplane/0000.jpg": jpeg})
    with pytest.raises(DatasetFileError, match="expected 1000 each"):  # a full read checks the counts
        read_cifar10_jpeg_tar(few, train=False)
    with pytest.raises(FileNotFoundError, match="expected cifar-10-batches-py/ or cifar10_jpg.tar.gz"):
        CIFAR10(tmp_path / "nowhere")


def test_cifar10_jpeg_cache_is_written_once_and_reused(cifar_tar, tmp_path, monkeypatch):
    calls = []
    fake = (np.zeros((3, 3, 32, 32), np.uint8), np.array([0, 1, 2]))

    def reader(path, train=True, limit_per_class=None):
        calls.append(path)
        return fake

    monkeypatch.setattr(images, "read_cifar10_jpeg_tar", reader)
    a = CIFAR10(cifar_tar.parent, train=False, cache_dir=tmp_path)
    b = CIFAR10(cifar_tar.parent, train=False, cache_dir=tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npy"))) == 2
    assert torch.equal(a.targets, b.targets) and b.targets.tolist() == [0, 1, 2]


def _write_python_batches(root, n=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n)),
                 b"batch_label": name.encode()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)  # the official files are python-2 pickles of this shape
    return d


def test_cifar10_python_batches(tmp_path):
    d = _write_python_batches(tmp_path)
    train, test = CIFAR10(tmp_path, train=True), CIFAR10(tmp_path, train=False)
    assert train.data.shape == (20, 3, 32, 32) and test.data.shape == (4, 3, 32, 32)
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(test.data[1], torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32)))
    assert test.targets.tolist() == [0, 1, 2, 3]


def test_cifar10_python_batch_that_runs_code_is_refused(tmp_path):
    d = _write_python_batches(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetFileError, match="test_batch: not a readable CIFAR-10 python batch.*not allowed"):
        CIFAR10(tmp_path, train=False)
    (d / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(DatasetFileError, match="data_batch_3"):
        CIFAR10(tmp_path, train=True)


def test_jpeg_roundtrip_of_a_synthetic_member(tmp_path):
    """The reader's layout: class order = CIFAR ids, (C, H, W) uint8 pixels."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    tar = _make_tar(tmp_path / "t.tar.gz", {f"train/{c}/0000.jpg": buf.getvalue() for c in images.CIFAR10_CLASSES})
    data, labels = read_cifar10_jpeg_tar(tar, train=True, limit_per_class=1)
    assert labels.tolist() == list(range(10)) and data.shape == (10, 3, 32, 32)
    assert data[:, 0].mean() > 240 and data[:, 1:].mean() < 15


@pytest.fixture(scope="module")
def cifar_full(cifar_tar):
    """The full real CIFAR-10 (decoded once into the user cache, then read from it)."""
    return CIFAR10(cifar_tar.parent, train=True), CIFAR10(cifar_tar.parent, train=False)


def _class_counts(subset) -> list[int]:
    return torch.bincount(subset.dataset.targets[torch.as_tensor(subset.indices)], minlength=10).tolist()


def test_cifar10_validation_subset_of_1000_covers_every_class(cifar_full):
    """The CPU recipes validate on 1,000 images: ``limit_val_batches: 2`` of 500 from the test set
    (``val_size`` 0), or ``val_size: 1000`` held out from training. The JPEG copy stores the test set
    sorted by class, so its first 1,000 images are all airplanes; the validation set must not be."""
    train, test = cifar_full
    assert torch.bincount(test.targets[:1000], minlength=10).tolist() == [1000] + [0] * 9  # the file order

    def module(val_size, seed=0):
        dm = images.CIFAR10DataModule(val_size=val_size, eval_batch_size=500, download=False, seed=seed)
        dm.load = lambda is_train: train if is_train else test  # one decode for every module here
        dm.setup("fit")
        return dm

    dm = module(0)  # validation = the test set, in a class-balanced seeded order
    assert len(dm.val_set) == 10000 and sorted(dm.val_set.indices) == list(range(10000))  # all of it, once
    first = torch.utils.data.Subset(test, dm.val_set.indices[:1000])  # what limit_val_batches=2 evaluates
    assert _class_counts(first) == [100] * 10
    batches = iter(dm.val_dataloader())
    _, y = next(batches)
    assert torch.bincount(y, minlength=10).tolist() == [50] * 10
    assert dm.val_set.indices == module(0).val_set.indices  # deterministic
    assert dm.test_set.targets.tolist() == test.targets.tolist()  # the test split and order are unchanged
    assert [y for _, y in torch.utils.data.Subset(dm.test_set, range(3))] == [0, 0, 0]

    dm = module(1000)  # 1,000 training images held out at random, seeded by the module's seed
    assert len(dm.val_set) == 1000 and len(dm.train_set) == 49000
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)  # disjoint
    assert set(dm.train_set.indices) | set(dm.val_set.indices) == set(range(50000))
    counts = _class_counts(dm.val_set)
    assert min(counts) >= 70 and max(counts) <= 130, counts  # a random 1,000 of 50,000: 100 +- 9.5 per class
    assert dm.val_set.indices == module(1000).val_set.indices  # same every run (not seed_everything)
    torch.manual_seed(123)
    assert dm.val_set.indices == module(1000).val_set.indices
    assert dm.val_set.indices != module(1000, seed=1).val_set.indices


def test_class_balanced_order_prefixes():
    targets = torch.tensor([0] * 7 + [1] * 3 + [2] * 5 + [3] * 5)
    order = images.class_balanced_order(targets, seed=0)
    assert sorted(order) == list(range(len(targets)))
    for k in range(1, 13):  # while every class has items left (3 rounds of 4)
        counts = torch.bincount(targets[order[:k]], minlength=4)
        assert counts.max() - counts.min() <= 1
    assert order == images.class_balanced_order(targets, seed=0)
    assert order != images.class_balanced_order(targets, seed=1)
    assert images.class_balanced_order(torch.zeros(0, dtype=torch.long)) == []
