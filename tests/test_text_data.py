"""Char-level text data: stream batching, state carry, vocabulary, readers and their errors."""
from __future__ import annotations

import bz2
import math

import pytest
import torch

from conftest import require_file
from hypernetworks.data.text import (IGNORE_INDEX, UNK, Enwik8DataModule, PTBCharDataModule, PydocTextDataModule,
                                     StreamBatches, Vocabulary, contiguous_split, enwik8_splits, pydoc_text,
                                     read_enwik8_bytes, read_ptb_char)
from hypernetworks.models.char_lm import CharLM


@pytest.mark.parametrize("n,b,t,world", [(1000, 7, 13, 1), (1001, 8, 10, 2), (257, 4, 100, 4), (50, 49, 3, 1)])
def test_every_symbol_predicted_exactly_once(n, b, t, world):
    data = torch.arange(n)  # ids are positions, so targets name what they predict
    seen_targets, pairs = [], []
    for rank in range(world):
        sb = StreamBatches(data, b, t, rank=rank, world_size=world)
        assert len(sb) == math.ceil(math.ceil((n - 1) / b) / t)
        windows = list(sb)
        assert [w for _, _, w in windows] == list(range(len(sb)))
        for x, y, _ in windows:
            assert x.shape == y.shape and x.shape[0] == b // world and x.dtype == torch.int64
            keep = y != IGNORE_INDEX
            seen_targets += y[keep].tolist()
            pairs += list(zip(x[keep].tolist(), y[keep].tolist()))
    assert sorted(seen_targets) == list(range(1, n))
    assert all(tgt == inp + 1 for inp, tgt in pairs)  # each target follows its input in the text


def test_streams_are_contiguous_and_padding_only_at_the_end():
    sb = StreamBatches(torch.arange(1000), 7, 13)
    for row_x, row_y in zip(sb.inputs, sb.targets):
        valid = (row_y != IGNORE_INDEX).nonzero().flatten()
        assert valid.tolist() == list(range(len(valid)))  # no holes
        assert torch.equal(row_y[valid], row_x[valid] + 1)
        assert torch.all(row_x[1:len(valid)] - row_x[:len(valid) - 1] == 1)


def test_windowed_evaluation_with_carried_state_equals_one_pass():
    torch.manual_seed(0)
    model = CharLM(11, "lstm", hidden_size=16).eval()
    data = torch.randint(11, (603,))
    sb = StreamBatches(data, 4, 17)
    with torch.no_grad():
        state, nll_windowed, count = None, 0.0, 0
        for x, y, _ in sb:
            logits, state = model(x, state)
            nll_windowed += torch.nn.functional.cross_entropy(
                logits.reshape(-1, 11), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
        logits, _ = model(sb.inputs.long())
        nll_once = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 11), sb.targets.long().reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").item()
    assert count == 602
    assert nll_windowed == pytest.approx(nll_once, rel=1e-5)


def test_stream_batches_resume_position():
    sb = StreamBatches(torch.arange(500), 5, 10)
    it = iter(sb)
    for _ in range(3):  # three windows handed out (and trained on)
        next(it)
    state = sb.state_dict()
    assert state == {"next_window": 3}
    fresh = StreamBatches(torch.arange(500), 5, 10)
    fresh.load_state_dict(state)
    assert [w for _, _, w in fresh][0] == 3
    assert [w for _, _, w in fresh][0] == 0  # the next epoch starts from the beginning again


@pytest.mark.parametrize("kwargs,name", [(dict(batch_size=0, seq_len=5), "batch_size"),
                                         (dict(batch_size=3, seq_len=0), "seq_len"),
                                         (dict(batch_size=3, seq_len=5, world_size=2), "divisible")])
def test_stream_batches_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StreamBatches(torch.arange(100), **kwargs)


def test_split_too_short_for_batch():
    with pytest.raises(ValueError, match="too short"):
        StreamBatches(torch.arange(5), 8, 2)


def test_vocabulary_unknown_policies():
    v = Vocabulary.from_text("abcab", "error")
    assert v.symbols == ["a", "b", "c"]
    assert v.encode("cab").tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"not in the training vocabulary.*'z'"):
        v.encode("abz", where="valid split")
    u = Vocabulary.from_text("abc", "unk")
    assert u.symbols[-1] == UNK and u.encode("azb").tolist() == [0, 3, 1]
    s = Vocabulary.from_text("abc", "skip")
    with pytest.warns(UserWarning, match="skipped 2"):
        assert s.encode("azzb").tolist() == [0, 1]
    with pytest.raises(ValueError, match="unknown"):
        Vocabulary(["a"], unknown="ignore")


def test_pydoc_split_is_contiguous_and_vocab_from_train():
    dm = PydocTextDataModule(batch_size=4, seq_len=8)
    text = pydoc_text()
    parts = [text[s] for s in contiguous_split(len(text))]
    assert "".join(parts) == text
    assert [len(p) for p in parts] == [dm.split_ids(s).numel() for s in ("train", "valid", "test")]
    assert set(dm.vocab.symbols) - {UNK} == set(parts[0])
    assert dm.vocab.decode(dm.split_ids("train")[:200]) == parts[0][:200]


def test_bad_datamodule_values():
    with pytest.raises(ValueError, match="batch_size"):
        PydocTextDataModule(batch_size=0)
    with pytest.raises(ValueError, match="unknown"):
        PydocTextDataModule(unknown="drop")
    with pytest.raises(ValueError, match="fractions"):
        contiguous_split(10, (0.5, 0.5, 0.1))


def test_ptb_char_real_files(shared_data):
    root = shared_data / "ptb"
    require_file(root / "ptb.char.valid.txt")
    dm = PTBCharDataModule(root=str(root))
    assert len(dm.vocab) == 50  # the paper's 50 symbols, built from train only
    assert " " in dm.vocab.symbols and "\n" in dm.vocab.symbols and "_" not in dm.vocab.symbols
    valid = read_ptb_char(root / "ptb.char.valid.txt")
    assert valid.startswith("consumers may want to move their telephones")
    assert dm.split_ids("valid").numel() == len(valid)


def test_ptb_missing_and_corrupt_files(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="ptb.char.train.txt"):
        PTBCharDataModule(root=str(tmp_path)).setup("fit")
    bad = tmp_path / "ptb.char.train.txt"
    bad.write_text(" the cat sat \n")  # word-level text, not char tokens
    with pytest.raises(ValueError, match="ptb.char.train.txt.*not a single character"):
        read_ptb_char(bad)
    bad.write_bytes(b"\xff\xfe\x00a b")
    with pytest.raises(ValueError, match="ptb.char.train.txt.*UTF-8"):
        read_ptb_char(bad)
    bad.write_text("   ")
    with pytest.raises(ValueError, match="empty"):
        read_ptb_char(bad)


def test_enwik8_standin_protocol(shared_data):
    path = require_file(shared_data / "wikipedia_xml_gensim" /
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    raw = read_enwik8_bytes(path)
    assert len(raw) == 6_089_746
    parts = enwik8_splits(raw)
    assert b"".join(parts) == raw and abs(len(parts[0]) / len(raw) - 0.9) < 1e-6
    dm = Enwik8DataModule(path=str(path), batch_size=4, seq_len=8)
    assert len(dm.vocab) <= 257 and dm.vocab.symbols[-1] == UNK
    assert dm.split_ids("test").numel() == len(parts[2])


def test_enwik8_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="enwik8.zip"):
        read_enwik8_bytes(tmp_path / "enwik8.zip")
    bad = tmp_path / "x.bz2"
    bad.write_bytes(bz2.compress(b"hello")[:10])
    with pytest.raises(ValueError, match="x.bz2"):
        read_enwik8_bytes(bad)
    badzip = tmp_path / "enwik8.zip"
    badzip.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="enwik8.zip"):
        read_enwik8_bytes(badzip)
