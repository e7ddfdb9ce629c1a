"""Where datasets live: one data folder shared by every data module and recipe.

The data folder is ``$HYPERNETWORKS_DATA`` when that is set, else the per-user data directory
``$XDG_DATA_HOME/hypernetworks`` (``~/.local/share/hypernetworks`` when ``XDG_DATA_HOME`` is unset).
Each dataset has its own subfolder::

    <data folder>/ptb/ptb.char.{train,valid,test}.txt
    <data folder>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <data folder>/cifar10/cifar-10-batches-py/  (or cifar10_jpg.tar.gz)
    <data folder>/enwik8/enwik8.zip
    <data folder>/iam_ondb/iam_ondb_linestrokes.npz
    <data folder>/multi30k_en_fr/{train,val,test_2016_flickr,...}.{en,fr}[.gz]
    <data folder>/tatoeba_anki_fra_eng/fra-eng.zip
    <data folder>/wmt14_en_fr/...

The folder is read when a data module is built (not when this module is imported), so setting
the variable in a running program works. A ``root`` (or ``path``) given explicitly to a data module
is used as given, as before.

Missing files raise :class:`DataNotFoundError`, whose message is one paragraph saying which files,
where they were looked for, how to point elsewhere and how to download them (or why they are not
downloaded). The command line prints that paragraph instead of a traceback.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["ENV_VAR", "DATASETS", "DataNotFoundError", "data_root", "dataset_dir", "require_files"]

ENV_VAR = "HYPERNETWORKS_DATA"


def data_root() -> Path:
    """The data folder: ``$HYPERNETWORKS_DATA``, else ``$XDG_DATA_HOME/hypernetworks``
    (``~/.local/share/hypernetworks``). Read at call time."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "hypernetworks"


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    folder: str  # subfolder of the data folder
    downloadable: bool  # the data module can fetch it from the owner's public URL (``download: true``)
    source: str  # where a user gets it by hand (and, when not downloadable, why not)


DATASETS: dict[str, DatasetInfo] = {
    "ptb": DatasetInfo(
        "Penn Treebank (character level)", "ptb", False,
        "PTB is licensed by the LDC, so it is not downloaded here; Mikolov's character files "
        "ptb.char.{train,valid,test}.txt are in data/ of simple-examples.tgz "
        "(http://www.fit.vutbr.cz/~imikolov/rnnlm/)"),
    "mnist": DatasetInfo("MNIST", "mnist", True, "http://yann.lecun.com/exdb/mnist/"),
    "cifar10": DatasetInfo("CIFAR-10", "cifar10", True, "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "enwik8": DatasetInfo("enwik8", "enwik8", True, "http://mattmahoney.net/dc/textdata.html"),
    "iam_ondb": DatasetInfo(
        "IAM On-Line Handwriting (IAM-OnDB)", "iam_ondb", False,
        "IAM-OnDB is given out after a free registration, so it is not downloaded here: get "
        "lineStrokes-all.tar.gz and ascii-all.tar.gz from "
        "https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database and pass the folder "
        "holding the unpacked lineStrokes/ and ascii/ as --data.init_args.xml_root"),
    "multi30k": DatasetInfo(
        "Multi30k En-Fr", "multi30k_en_fr", False,
        "not downloaded here: the gzipped files are in data/task1/raw/ of https://github.com/multi30k/dataset "
        "(this project used commit a3d2e0d26b56f3846f66a952536ffed4e401d05a)"),
    "tatoeba": DatasetInfo(
        "Tatoeba / Anki fra-eng", "tatoeba_anki_fra_eng", False,
        "fra-eng.zip is at https://www.manythings.org/anki/ (that site asks not to be fetched by scripts)"),
    "wmt14": DatasetInfo("WMT'14 En-Fr", "wmt14_en_fr", True, "https://www.statmt.org/wmt14/translation-task.html"),
}


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``root`` as given when it is not None, else ``<data folder>/<the dataset's subfolder>``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    return data_root() / DATASETS[name].folder


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message is a paragraph a user can act on."""

    def __init__(self, message: str, dataset: str, missing: Sequence[Path]) -> None:
        super().__init__(message)
        self.dataset, self.missing = dataset, list(missing)

    def __str__(self) -> str:
        return self.args[0]


def _describe_root(explicit: bool, option: str) -> str:
    if explicit:
        return (f"That location was given explicitly ({option}, --data.init_args.{option}); fix it, or leave "
                "it out to use the data folder.")
    env = os.environ.get(ENV_VAR)
    where = (f"from ${ENV_VAR}" if env else
             f"the per-user default, as ${ENV_VAR} is not set")
    return f"The data folder is {data_root()} ({where})."


def _names(group: Sequence[Path]) -> str:
    names = [Path(p).name for p in group]
    if len(names) == 2 and names[1] == names[0] + ".gz":
        return f"{names[0]}[.gz]"
    return " or ".join(names)


def require_files(dataset: str, candidates: Sequence[Sequence[Path]], *, explicit: bool,
                  option: str = "root", download: bool = False) -> None:
    """Raise :class:`DataNotFoundError` unless, for every group in ``candidates``, one of its paths
    exists (a group lists alternatives, e.g. ``x.gz`` or ``x``). Does nothing when ``download`` is
    on and the dataset can be downloaded: the data module fetches it."""
    info = DATASETS[dataset]
    if download and info.downloadable:
        return
    missing = [group for group in candidates if not any(Path(p).exists() for p in group)]
    if not missing:
        return
    names = ", ".join(_names(group) for group in missing)
    folders = sorted({str(Path(group[0]).parent) for group in missing})
    sentences = [
        f"{info.title} not found: no {names} in {' or '.join(folders)}.",
        _describe_root(explicit, option),
    ]
    if not explicit:
        sentences.append(f"Put the files in {data_root() / info.folder}, set {ENV_VAR} to a folder that "
                         f"holds {info.folder}/, or pass --data.init_args.{option} PATH.")
    if info.downloadable:
        sentences.append("To fetch it from the owner's site (needs internet), add --data.init_args.download true; "
                         f"source: {info.source}.")
    else:
        sentences.append(info.source[0].upper() + info.source[1:] + ".")
    message = textwrap.fill(" ".join(sentences), width=100, break_long_words=False, break_on_hyphens=False)
    raise DataNotFoundError(message, dataset, [Path(group[0]) for group in missing])
