"""Parallel-corpus reader, subword tokenizer and batching."""
from __future__ import annotations

import gzip
import zipfile

import pytest
import torch

from hypernetworks.data.parallel import (BOS_ID, EOS_ID, PAD_ID, BucketBatchSampler, SubwordTokenizer,
                                         TranslationDataModule, collate_pairs, read_lines, read_parallel,
                                         read_tsv_pairs, seeded_split)
from tests.conftest import require_file

EN = ["A man rides a bike.", "Two dogs play in the snow.", "A girl reads a book."]
FR = ["Un homme fait du vélo.", "Deux chiens jouent dans la neige.", "Une fille lit un livre."]


def _write(path, lines, gz=False):
    text = "".join(s + "\n" for s in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_plain_and_gzip_read_the_same(tmp_path):
    plain = read_parallel(_write(tmp_path / "a.en", EN), _write(tmp_path / "a.fr", FR))
    # gzip is detected by content, so a misleading suffix does not matter
    gz = read_parallel(_write(tmp_path / "b.en.gz", EN, gz=True), _write(tmp_path / "b.fr", FR, gz=True))
    assert plain.src == gz.src == EN and plain.tgt == gz.tgt == FR
    assert len(plain) == 3 and plain.n_empty_dropped == 0


def test_crlf_line_endings_are_stripped(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes("un\r\ndeux\r\n".encode())
    assert read_lines(p) == ["un", "deux"]


def test_misaligned_files_name_both_files_and_counts(tmp_path):
    src = _write(tmp_path / "x.en", EN)
    tgt = _write(tmp_path / "x.fr.gz", FR[:2], gz=True)
    with pytest.raises(ValueError) as e:
        read_parallel(src, tgt)
    msg = str(e.value)
    assert str(src) in msg and str(tgt) in msg and "3 lines" in msg and "2 lines" in msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.en"):
        read_parallel(tmp_path / "nope.en", tmp_path / "nope.fr")


def test_empty_lines_are_counted_or_rejected(tmp_path):
    src = _write(tmp_path / "e.en", ["one", "", "three", "four"])
    tgt = _write(tmp_path / "e.fr", ["un", "deux", "   ", "quatre"])
    c = read_parallel(src, tgt)  # default: skip and count
    assert c.src == ["one", "four"] and c.tgt == ["un", "quatre"]
    assert c.n_empty_dropped == 2 and c.n_read == 4
    with pytest.raises(ValueError, match=r"line 2 of .*e\.en"):
        read_parallel(src, tgt, empty="error")
    assert len(read_parallel(src, tgt, empty="keep")) == 4
    with pytest.raises(ValueError, match="empty"):
        read_parallel(src, tgt, empty="drop")


def test_tsv_pairs_plain_gzip_zip_and_errors(tmp_path):
    lines = [f"{e}\t{f}\tCC-BY 2.0 (France) Attribution" for e, f in zip(EN, FR)]  # newer Anki column ignored
    plain = read_tsv_pairs(_write(tmp_path / "p.txt", lines))
    gz = read_tsv_pairs(_write(tmp_path / "p.txt.gz", lines, gz=True))
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as zf:
        zf.writestr("_about.txt", "about")
        zf.writestr("fra.txt", "".join(s + "\n" for s in lines))
    zipped = read_tsv_pairs(tmp_path / "p.zip")
    assert plain.src == gz.src == zipped.src == EN and plain.tgt == zipped.tgt == FR
    rev = read_tsv_pairs(tmp_path / "p.zip", reverse=True)
    assert rev.src == FR and rev.tgt == EN
    bad = _write(tmp_path / "bad.txt", [lines[0], "no tab here"])
    with pytest.raises(ValueError, match=r"bad\.txt line 2"):
        read_tsv_pairs(bad)
    blank = read_tsv_pairs(_write(tmp_path / "blank.txt", [lines[0], "", lines[1]]))
    assert len(blank) == 2 and blank.n_empty_dropped == 1


def test_seeded_split_is_disjoint_and_reproducible():
    a = seeded_split(100, 0.1, 5, seed=3)
    assert a == seeded_split(100, 0.1, 5, seed=3) and a != seeded_split(100, 0.1, 5, seed=4)
    tr, va, te = a
    assert (len(tr), len(va), len(te)) == (85, 10, 5)
    assert sorted(tr + va + te) == list(range(100))
    with pytest.raises(ValueError):
        seeded_split(10, 5, 5)


def test_real_multi30k_and_tatoeba(shared_data):
    m = shared_data / "multi30k_en_fr"
    require_file(m / "val.en.gz")
    val = read_parallel(m / "val.en.gz", m / "val.fr.gz")
    assert val.n_read == 1014 and len(val) + val.n_empty_dropped == 1014
    z = require_file(shared_data / "tatoeba_anki_fra_eng" / "fra-eng.zip")
    pairs = read_tsv_pairs(z)
    assert len(pairs) + pairs.n_empty_dropped == 142787
    assert pairs.src[0] and pairs.tgt[0] and "\t" not in pairs.tgt[0]
    dm = TranslationDataModule(dataset="tatoeba", root=str(z.parent), valid_size=1000, test_size=1000, split_seed=1)
    tr, va, te = (dm.read_split(s) for s in ("train", "val", "test"))
    assert (len(va), len(te)) == (1000, 1000) and len(tr) == len(pairs) - 2000
    assert va.src != te.src and va.src == dm.read_split("val").src  # seeded, reproducible


def test_tokenizer_round_trip_and_cache(tmp_path, shared_data):
    m = shared_data / "multi30k_en_fr"
    require_file(m / "val.en.gz")
    val = read_parallel(m / "val.en.gz", m / "val.fr.gz")
    text = val.src + val.tgt
    tok = SubwordTokenizer.cached(text, 500, [tmp_path])
    cached = list(tmp_path.glob("spm-500-*.model"))
    assert len(cached) == 1 and tok.vocab_size == 500
    again = SubwordTokenizer.cached(text, 500, [tmp_path])  # read back, not retrained
    assert again.model_bytes == cached[0].read_bytes() == tok.model_bytes
    for s in EN + FR + ["Un chien noir court sur l'herbe verte."]:
        ids = tok.encode(s)
        assert all(4 <= i < 500 for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, 17]) == s  # specials dropped, stops at EOS
    assert SubwordTokenizer(tok.model_bytes).encode(EN[0]) == tok.encode(EN[0])  # bytes alone rebuild it


def test_collate_and_bucket_sampler():
    items = [{"index": i, "src": list(range(4, 4 + n)), "tgt": list(range(5, 5 + n + 1)), "src_text": "", "tgt_text": ""}
             for i, n in enumerate([3, 1, 5])]
    b = collate_pairs(items)
    assert b["src"].shape == (3, 5) and b["tgt_in"].shape == (3, 7)
    assert b["src_lengths"].tolist() == [3, 1, 5]
    assert b["tgt_in"][1, :3].tolist() == [BOS_ID, 5, 6] and b["tgt_in"][1, 3:].eq(PAD_ID).all()
    assert b["tgt_out"][1, :3].tolist() == [5, 6, EOS_ID] and b["tgt_out"][1, 3:].eq(PAD_ID).all()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (500,), generator=g).tolist()
    s = BucketBatchSampler(lengths, batch_size=32, max_tokens=400, shuffle=True, seed=0)
    batches = list(s)
    assert sorted(i for bt in batches for i in bt) == list(range(500))
    for bt in batches:
        assert len(bt) <= 32 and (len(bt) == 1 or max(lengths[i] for i in bt) * len(bt) <= 400)
    assert list(s) != batches  # reshuffled for the next epoch
    shards = [list(BucketBatchSampler(lengths, 32, 400, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(x) for x in shards}) == 1  # every rank steps equally often
    assert set(i for x in shards for bt in x for i in bt) == set(range(500))
