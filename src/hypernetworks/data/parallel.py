"""Parallel corpora for translation: readers, a SentencePiece subword tokenizer and a
LightningDataModule with length-bucketed, padded batches.

Corpora:
- ``multi30k``: Multi30k task 1 En-Fr (``train/val/test_2016_flickr.{en,fr}.gz``), read offline.
- ``tatoeba``: the Tatoeba/Anki ``fra.txt`` (``english<TAB>french``), plain, gzip or inside
  ``fra-eng.zip``; it has no official split, so a seeded random one is made.
- ``files``: any line-aligned source/target files (plain or gzip) or tab-separated pair files.
- ``wmt14``: WMT'14 En-Fr (about 36M pairs) for users with internet: ``download_wmt14_en_fr``
  fetches the standard training corpora and newstest2012/2013 (dev) and newstest2014 (test).

The subword model is learned on the training split only and cached in ``cache_dir`` (e.g. beside
your data) or the user cache ``$HYPERNETWORKS_CACHE`` / ``~/.cache/hypernetworks`` -- never in the
source tree nor in a shared dataset folder; its bytes travel inside checkpoints.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import random
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from hypernetworks.data.root import dataset_dir, require_files

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
EMPTY_POLICIES = ("skip", "error", "keep")


# ----------------------------------------------------------------------------- readers
def _open_text(path: Path) -> io.TextIOBase:
    """Open plain or gzip text (decided by the magic bytes, not the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parallel corpus file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a plain or gzip UTF-8 file, without line endings (``\\r\\n`` too)."""
    try:
        with _open_text(Path(path)) as f:
            return [line.rstrip("\r\n") for line in f]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read {path} as UTF-8 text (plain or gzip; damaged or truncated?): "
                         f"{type(e).__name__}: {e}") from e


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs plus what the reader dropped (counted, never silent)."""

    src: list[str]
    tgt: list[str]
    n_read: int = 0
    n_empty_dropped: int = 0
    n_long_dropped: int = 0
    sources: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.src)

    def subset(self, indices: Sequence[int]) -> "ParallelCorpus":
        return ParallelCorpus([self.src[i] for i in indices], [self.tgt[i] for i in indices],
                              n_read=len(indices), sources=self.sources)


def _apply_empty_policy(src: list[str], tgt: list[str], empty: str, names: tuple[str, str]) -> ParallelCorpus:
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    keep_s, keep_t, dropped = [], [], 0
    for i, (s, t) in enumerate(zip(src, tgt)):
        s, t = s.strip(), t.strip()
        if not s or not t:
            if empty == "error":
                which = names[0] if not s else names[1]
                raise ValueError(f"empty sentence at line {i + 1} of {which} (pass empty='skip' to drop such pairs)")
            if empty == "skip":
                dropped += 1
                continue
        keep_s.append(s)
        keep_t.append(t)
    if dropped:
        log.info("dropped %d pairs with an empty side from %s", dropped, " / ".join(names))
    return ParallelCorpus(keep_s, keep_t, n_read=len(src), n_empty_dropped=dropped, sources=names)


def read_parallel(src_path: str | Path, tgt_path: str | Path, empty: str = "skip") -> ParallelCorpus:
    """Read line-aligned source and target files (plain or gzip).

    Files with different line counts raise a ValueError naming both files and both counts.
    ``empty``: ``"skip"`` drops pairs with an empty (or blank) side and counts them in
    ``n_empty_dropped``; ``"error"`` raises naming the file and line; ``"keep"`` keeps them.
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"misaligned parallel files: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)} lines"
        )
    return _apply_empty_policy(src, tgt, empty, (str(src_path), str(tgt_path)))


def _tsv_lines(path: Path, member: str | None) -> tuple[list[str], str]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if member is None:
                cands = [n for n in zf.namelist() if n.endswith(".txt") and not Path(n).name.startswith("_")]
                if len(cands) != 1:
                    raise ValueError(f"{path}: pass member=, the archive holds {cands or 'no .txt file'}")
                member = cands[0]
            try:
                raw = zf.read(member)
            except KeyError:
                raise FileNotFoundError(f"{member!r} not found inside {path}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # CRC mismatch, bad deflate data
                raise ValueError(f"{path}: member {member!r} is damaged ({type(e).__name__}: {e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: member {member!r} is not UTF-8 text ({e})") from None
        return [line.rstrip("\r") for line in text.split("\n")[: -1 if text.endswith("\n") else None]], f"{path}:{member}"
    return read_lines(path), str(path)


def read_tsv_pairs(path: str | Path, member: str | None = None, empty: str = "skip",
                   reverse: bool = False) -> ParallelCorpus:
    """Read ``source<TAB>target[<TAB>anything]`` lines (plain, gzip, or a member of a zip).

    Extra columns (e.g. the attribution column of newer Anki exports) are ignored; a line
    without a tab raises a ValueError naming the file and line. ``reverse`` swaps the columns.
    """
    lines, name = _tsv_lines(Path(path), member)
    src, tgt = [], []
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if len(parts) < 2:
            if not line.strip() and empty != "error":
                parts = ["", ""]  # a blank line is an empty pair, handled by the policy below
            else:
                raise ValueError(f"{name} line {i + 1}: expected 'source<TAB>target', found no tab: {line[:60]!r}")
        src.append(parts[0])
        tgt.append(parts[1])
    if reverse:
        src, tgt = tgt, src
    return _apply_empty_policy(src, tgt, empty, (name, name))


def seeded_split(n: int, valid: int | float, test: int | float, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Deterministic random train/valid/test index split; sizes are counts or fractions."""
    def count(x):
        k = int(round(x * n)) if isinstance(x, float) else int(x)
        if k < 0:
            raise ValueError(f"split sizes must be >= 0, got {x}")
        return k

    nv, nt = count(valid), count(test)
    if nv + nt >= n:
        raise ValueError(f"valid ({nv}) + test ({nt}) leave no training pairs out of {n}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[nv + nt:]), sorted(idx[:nv]), sorted(idx[nv:nv + nt])


# ----------------------------------------------------------------------------- WMT'14 (users with internet)
# The standard WMT'14 En-Fr training corpora (as used by GNMT / fairseq), member paths inside each archive.
WMT14_EN_FR_TRAIN = {
    "europarl-v7": ("https://www.statmt.org/europarl/v7/fr-en.tgz", "europarl-v7.fr-en.{lang}"),
    "commoncrawl": ("https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz", "commoncrawl.fr-en.{lang}"),
    "un": ("https://www.statmt.org/wmt13/training-parallel-un.tgz", "un/undoc.2000.fr-en.{lang}"),
    "news-commentary-v9": ("https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz",
                           "training/news-commentary-v9.fr-en.{lang}"),
    "giga-fren": ("https://www.statmt.org/wmt10/training-giga-fren.tar", "giga-fren.release2.fixed.{lang}.gz"),
}
# sacrebleu test-set names: newstest2012 + 2013 for validation, newstest2014 (full) for test.
WMT14_EVAL_SETS = {"newstest2012": "wmt12", "newstest2013": "wmt13", "newstest2014": "wmt14/full"}


def download_wmt14_en_fr(root: str | Path, corpora: Iterable[str] | None = None) -> Path:
    """Download WMT'14 En-Fr into ``root`` (tens of GB; needs internet). Never used by tests.

    Writes ``train.en.gz``/``train.fr.gz`` (all corpora concatenated, line-aligned) and
    ``newstest20{12,13,14}.{en,fr}`` (via sacrebleu's test-set cache). Existing outputs are kept.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = list(corpora or WMT14_EN_FR_TRAIN)
    unknown = set(names) - set(WMT14_EN_FR_TRAIN)
    if unknown:
        raise ValueError(f"corpora: unknown {sorted(unknown)}; known: {sorted(WMT14_EN_FR_TRAIN)}")
    out_en, out_fr = root / "train.en.gz", root / "train.fr.gz"
    if not (out_en.exists() and out_fr.exists()):
        tmp_en, tmp_fr = out_en.with_suffix(".part"), out_fr.with_suffix(".part")
        with gzip.open(tmp_en, "wt", encoding="utf-8") as fe, gzip.open(tmp_fr, "wt", encoding="utf-8") as ff:
            for name in names:
                url, member = WMT14_EN_FR_TRAIN[name]
                archive = root / "downloads" / url.rsplit("/", 1)[1]
                if not archive.exists():
                    archive.parent.mkdir(parents=True, exist_ok=True)
                    log.info("downloading %s", url)
                    urllib.request.urlretrieve(url, archive.with_suffix(".part"))
                    archive.with_suffix(".part").rename(archive)
                with tarfile.open(archive) as tf:
                    en = _tar_lines(tf, member.format(lang="en"))
                    fr = _tar_lines(tf, member.format(lang="fr"))
                if len(en) != len(fr):
                    raise ValueError(f"misaligned WMT corpus {name}: en has {len(en)} lines, fr has {len(fr)}")
                fe.writelines(s + "\n" for s in en)
                ff.writelines(s + "\n" for s in fr)
        tmp_en.rename(out_en)
        tmp_fr.rename(out_fr)
    from sacrebleu.utils import get_reference_files, get_source_file

    for out_name, sb_name in WMT14_EVAL_SETS.items():
        for lang, path in (("en", get_source_file(sb_name, "en-fr")), ("fr", get_reference_files(sb_name, "en-fr")[0])):
            dest = root / f"{out_name}.{lang}"
            if not dest.exists():
                dest.write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    return root


def _tar_lines(tf: tarfile.TarFile, member: str) -> list[str]:
    f = tf.extractfile(member)
    if f is None:
        raise FileNotFoundError(f"{member} not found in {tf.name}")
    try:
        data = f.read()
        if member.endswith(".gz"):
            data = gzip.decompress(data)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
        raise ValueError(f"{tf.name}: member {member} is damaged or truncated ({type(e).__name__}: {e})") from None
    return [s.rstrip("\r") for s in data.decode("utf-8", errors="replace").split("\n")[:-1]]


# ----------------------------------------------------------------------------- tokenizer
def default_cache_dir() -> Path:
    return Path(os.environ.get("HYPERNETWORKS_CACHE", Path.home() / ".cache" / "hypernetworks")) / "sentencepiece"


class SubwordTokenizer:
    """A joint source+target SentencePiece model with ids pad=0, unk=1, bos=2, eos=3.

    ``model_bytes`` is the serialized model, so the tokenizer can be stored in a checkpoint.
    """

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError("the SentencePiece model must use pad=0, unk=1, bos=2, eos=3 (train it with SubwordTokenizer.train)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        def clean(seq):  # drop specials; stop at end of sentence
            out = []
            for i in seq:
                i = int(i)
                if i == EOS_ID:
                    break
                if i not in (PAD_ID, BOS_ID):
                    out.append(i)
            return out

        if len(ids) and not isinstance(ids[0], int) and hasattr(ids[0], "__len__"):
            return [self.sp.decode(clean(s)) for s in ids]
        return self.sp.decode(clean(ids))

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, model_type: str = "unigram",
              character_coverage: float = 1.0, hard_vocab_limit: bool = True) -> "SubwordTokenizer":
        import sentencepiece as spm

        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(sentences)), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, hard_vocab_limit=hard_vocab_limit,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2,
        )
        return cls(buf.getvalue())

    @classmethod
    def cached(cls, sentences: Sequence[str], vocab_size: int, cache_dirs: Sequence[Path], **kw) -> "SubwordTokenizer":
        """Train once per (training text, settings); reuse the first cached copy found."""
        h = hashlib.sha256(repr(sorted(kw.items())).encode() + f"|{vocab_size}|".encode())
        for s in sentences:
            h.update(s.encode("utf-8") + b"\n")
        name = f"spm-{vocab_size}-{h.hexdigest()[:16]}.model"
        for d in cache_dirs:
            if (Path(d) / name).is_file():
                return cls((Path(d) / name).read_bytes())
        tok = cls.train(sentences, vocab_size, **kw)
        for d in cache_dirs:  # first writable one wins; the data folder may be read-only
            try:
                Path(d).mkdir(parents=True, exist_ok=True)
                tmp = Path(d) / f".{name}.{os.getpid()}.tmp"
                tmp.write_bytes(tok.model_bytes)
                tmp.replace(Path(d) / name)
                log.info("cached SentencePiece model at %s", Path(d) / name)
                break
            except OSError:
                continue
        return tok


# ----------------------------------------------------------------------------- dataset and batching
class EncodedPairs(Dataset):
    """Token ids of each pair plus the raw target text (BLEU compares against the raw text)."""

    def __init__(self, corpus: ParallelCorpus, tokenizer: SubwordTokenizer, max_len: int | None = None):
        src = tokenizer.encode(corpus.src)
        tgt = tokenizer.encode(corpus.tgt)
        keep = [i for i in range(len(src)) if max_len is None or (len(src[i]) <= max_len and len(tgt[i]) <= max_len)]
        self.n_long_dropped = len(src) - len(keep)
        self.src = [src[i] for i in keep]
        self.tgt = [tgt[i] for i in keep]
        self.src_text = [corpus.src[i] for i in keep]
        self.tgt_text = [corpus.tgt[i] for i in keep]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "src": self.src[i], "tgt": self.tgt[i], "src_text": self.src_text[i],
                "tgt_text": self.tgt_text[i]}


def collate_pairs(items: list[dict]) -> dict:
    """Right-pad to the longest in the batch. tgt_in = BOS + y, tgt_out = y + EOS."""
    b = len(items)
    s_len = max(1, max(len(it["src"]) for it in items))
    t_len = max(len(it["tgt"]) for it in items) + 1
    src = torch.full((b, s_len), PAD_ID, dtype=torch.long)
    tgt_in = torch.full((b, t_len), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((b, t_len), PAD_ID, dtype=torch.long)
    for k, it in enumerate(items):
        s, t = it["src"], it["tgt"]
        src[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        tgt_in[k, : len(t) + 1] = torch.tensor([BOS_ID, *t], dtype=torch.long)
        tgt_out[k, : len(t) + 1] = torch.tensor([*t, EOS_ID], dtype=torch.long)
    src_lengths = torch.tensor([max(1, len(it["src"])) for it in items], dtype=torch.long)
    return {"src": src, "src_lengths": src_lengths, "tgt_in": tgt_in, "tgt_out": tgt_out,
            "src_text": [it["src_text"] for it in items], "tgt_text": [it["tgt_text"] for it in items],
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long)}


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (little padding), capped by ``batch_size`` sentences and
    ``max_tokens`` padded tokens; batch order shuffled per epoch when ``shuffle``.

    For data parallel runs each rank takes every ``num_replicas``-th batch (batches are padded by
    repetition so all ranks step the same number of times; the test step de-duplicates by ``index``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, pad_to_replicas: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size, self.max_tokens, self.shuffle, self.seed = batch_size, max_tokens, shuffle, seed
        self.num_replicas, self.rank, self.pad_to_replicas = num_replicas, rank, pad_to_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)  # ties broken randomly, so buckets differ between epochs
        idx.sort(key=lambda i: self.lengths[i])
        batches, cur, cur_max = [], [], 0
        for i in idx:
            m = max(cur_max, self.lengths[i])
            if cur and (len(cur) >= self.batch_size or (self.max_tokens and m * (len(cur) + 1) > self.max_tokens)):
                batches.append(cur)
                cur, m = [], self.lengths[i]
            cur.append(i)
            cur_max = m
        if cur:
            batches.append(cur)
        if self.shuffle:
            rng.shuffle(batches)
        if self.num_replicas > 1:
            if self.pad_to_replicas and len(batches) % self.num_replicas:
                batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
            batches = batches[self.rank:: self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1 if self.shuffle else 0
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


# ----------------------------------------------------------------------------- data module
MULTI30K_TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")


class TranslationDataModule(LightningDataModule):
    """Source->target pairs as padded, length-bucketed batches.

    Args:
        dataset: ``multi30k`` | ``tatoeba`` | ``files`` | ``wmt14``.
        root: folder of the corpus (multi30k/wmt14: the split files; tatoeba: the folder with
            ``fra-eng.zip`` or ``fra.txt``).
        src_lang, tgt_lang: ``en``/``fr`` (either direction).
        train_files, val_files, test_files: for ``files``: ``[src, tgt]`` line-aligned files or
            ``[pairs.tsv]``.
        test_set: multi30k: one of ``test_2016_flickr`` (default), ``test_2017_flickr``,
            ``test_2017_mscoco``; wmt14: ``newstest2014``.
        vocab_size: joint SentencePiece vocabulary, learned on the training split only.
        batch_size, max_tokens: batch caps (sentences, padded source+target tokens).
        max_len: training pairs longer than this (subword tokens, either side) are dropped (counted).
        max_train_pairs: use only the first N training pairs (quick runs).
        split_seed, valid_size, test_size: tatoeba's seeded split (counts or fractions).
        cache_dir: where to cache the subword model (e.g. beside your own data); default
            ``$HYPERNETWORKS_CACHE/sentencepiece`` or ``~/.cache/hypernetworks/sentencepiece``.
        download: wmt14 only: fetch the corpus into ``root`` if missing (needs internet).
    """

    def __init__(self, dataset: str = "multi30k", root: str | None = None, src_lang: str = "en",
                 tgt_lang: str = "fr", train_files: list[str] | None = None, val_files: list[str] | None = None,
                 test_files: list[str] | None = None, test_set: str | None = None, vocab_size: int = 8000,
                 batch_size: int = 64, max_tokens: int | None = None, max_len: int | None = 100,
                 max_train_pairs: int | None = None, split_seed: int = 0, valid_size: float = 0.05,
                 test_size: float = 0.05, cache_dir: str | None = None, download: bool = False,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if dataset not in ("multi30k", "tatoeba", "files", "wmt14"):
            raise ValueError(f"dataset must be multi30k, tatoeba, files or wmt14, got {dataset!r}")
        if {src_lang, tgt_lang} != {"en", "fr"} and dataset != "files":
            raise ValueError(f"src_lang/tgt_lang must be en and fr for {dataset}, got {src_lang!r}->{tgt_lang!r}")
        if dataset == "files" and not train_files:
            raise ValueError("train_files is required when dataset='files'")
        self.save_hyperparameters()
        # root=None: <data folder>/<the corpus's folder>, resolved now (hypernetworks.data.root)
        self._root_given = root is not None
        self.root = dataset_dir(dataset, root) if dataset != "files" else (Path(root) if root else None)
        self.tokenizer: SubwordTokenizer | None = None
        self.splits: dict[str, EncodedPairs] = {}

    def check_data(self) -> None:
        """Raise DataNotFoundError (one paragraph: which files, where, what to do) if the corpus is missing."""
        hp, root = self.hparams, self.root
        if hp.dataset == "files":
            return  # the reader names any missing file
        if hp.dataset == "tatoeba":
            groups = [[root / "fra-eng.zip", root / "fra.txt", root / "fra.txt.gz"]]
        else:
            names = (["train", "val", hp.test_set or "test_2016_flickr"] if hp.dataset == "multi30k"
                     else ["train"])
            groups = [[root / f"{n}.{lang}", root / f"{n}.{lang}.gz"] for n in names for lang in ("en", "fr")]
        require_files(hp.dataset, groups, explicit=self._root_given, download=hp.download)

    def prepare_data(self) -> None:
        self.check_data()

    # -- reading
    def _read_files(self, files: list[str]) -> ParallelCorpus:
        if len(files) == 1:
            return read_tsv_pairs(files[0], reverse=self.hparams.src_lang == "fr")
        if len(files) == 2:
            return read_parallel(files[0], files[1])
        raise ValueError(f"expected [src, tgt] or [pairs.tsv], got {files}")

    def read_split(self, split: str) -> ParallelCorpus:
        """Raw pairs of ``train`` / ``val`` / ``test`` (in the source->target direction)."""
        hp = self.hparams
        root = self.root
        s, t = hp.src_lang, hp.tgt_lang
        if hp.dataset == "multi30k":
            name = {"train": "train", "val": "val", "test": hp.test_set or "test_2016_flickr"}[split]
            if split == "test" and name not in MULTI30K_TEST_SETS:
                raise ValueError(f"test_set must be one of {MULTI30K_TEST_SETS}, got {name!r}")
            return read_parallel(_find(root, f"{name}.{s}"), _find(root, f"{name}.{t}"))
        if hp.dataset == "wmt14":
            if hp.download and not (root / "train.en.gz").exists():
                download_wmt14_en_fr(root)
            if split == "train":
                return read_parallel(_find(root, f"train.{s}"), _find(root, f"train.{t}"))
            names = ["newstest2012", "newstest2013"] if split == "val" else [hp.test_set or "newstest2014"]
            parts = [read_parallel(_find(root, f"{n}.{s}"), _find(root, f"{n}.{t}")) for n in names]
            return ParallelCorpus(sum((p.src for p in parts), []), sum((p.tgt for p in parts), []),
                                  n_read=sum(p.n_read for p in parts))
        if hp.dataset == "tatoeba":
            path = next((p for p in (root / "fra-eng.zip", root / "fra.txt", root / "fra.txt.gz") if p.exists()), None)
            if path is None:
                raise FileNotFoundError(f"no fra-eng.zip / fra.txt / fra.txt.gz in {root}")
            corpus = read_tsv_pairs(path, reverse=s == "fr")
            tr, va, te = seeded_split(len(corpus), hp.valid_size, hp.test_size, seed=hp.split_seed)
            return corpus.subset({"train": tr, "val": va, "test": te}[split])
        files = {"train": hp.train_files, "val": hp.val_files, "test": hp.test_files}[split]
        if not files:
            raise ValueError(f"{split}_files is required for this stage (dataset='files')")
        return self._read_files(files)

    def _cache_dirs(self) -> list[Path]:
        # Not beside the data by default: shared dataset folders are read in place, never written.
        dirs = [Path(self.hparams.cache_dir)] if self.hparams.cache_dir else []
        return dirs + [default_cache_dir()]

    def build_tokenizer(self) -> SubwordTokenizer:
        if self.tokenizer is None:
            train = self.read_split("train")
            if self.hparams.max_train_pairs:
                train = train.subset(range(min(len(train), self.hparams.max_train_pairs)))
            self._train_raw = train
            # Learned on the training split only (both languages: one joint vocabulary).
            self.tokenizer = SubwordTokenizer.cached(train.src + train.tgt, self.hparams.vocab_size, self._cache_dirs())
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        tok = self.build_tokenizer()
        want = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage or "fit",
                                                                                                           ("train", "val", "test"))
        for split in want:
            if split in self.splits:
                continue
            raw = self._train_raw if split == "train" else self.read_split(split)
            ds = EncodedPairs(raw, tok, max_len=self.hparams.max_len if split == "train" else None)
            if raw.n_empty_dropped or ds.n_long_dropped:
                log.info("%s: %d pairs read, %d dropped (empty side), %d dropped (longer than %s tokens)", split,
                         raw.n_read, raw.n_empty_dropped, ds.n_long_dropped, self.hparams.max_len)
            self.splits[split] = ds

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        ds = self.splits[split]
        replicas, rank = 1, 0
        if self.trainer is not None and self.trainer.world_size > 1:
            replicas, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = BucketBatchSampler([len(s) + len(t) + 1 for s, t in zip(ds.src, ds.tgt)], self.hparams.batch_size,
                                     self.hparams.max_tokens, shuffle=shuffle, seed=self.hparams.seed,
                                     num_replicas=replicas, rank=rank)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _find(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``, whichever exists."""
    for p in (root / stem, root / f"{stem}.gz"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"corpus file not found: {root / stem}[.gz]")
