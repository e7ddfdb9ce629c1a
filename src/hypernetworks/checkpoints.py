"""Reading checkpoints without running code from them.

A checkpoint is data, and the project reads it as data in three steps:

1. **Integrity**: the zip archive that ``torch.save`` writes is CRC-checked before anything is
   unpickled (:func:`verify_archive`), so a file with flipped bytes or a truncated copy is refused
   instead of loading with wrong weights.
2. **No pickle**: ``torch.load(weights_only=True)`` for local files and for ``http(s)://`` URLs alike
   (:func:`read_checkpoint`; URLs are downloaded to a temporary file, never to a cache keyed by file
   name). A file holding pickled Python objects is refused, naming the object it asks for.
3. **Allow-list**: rebuilding a task from the settings saved in a checkpoint builds only the
   project's own tasks, data modules and models (:data:`TRUSTED_PACKAGES`) or classes the caller
   passes explicitly. Every ``{"class_path": ...}`` spec, at any depth of any dict or list of
   the saved settings, is checked *before* anything is imported or built
   (:func:`check_settings`), and :func:`build_from_settings` builds specs itself: string values are
   never parsed as class specs (jsonargparse would parse them, and build ``subprocess.Popen``).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import pickle
import re
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Iterable

__all__ = [
    "TRUSTED_PACKAGES",
    "CheckpointError",
    "build_from_settings",
    "check_settings",
    "check_weights_fit",
    "checkpoint_settings",
    "read_checkpoint",
    "resolve_trusted_class",
    "verify_archive",
]

# The classes a checkpoint's saved settings may name: the project's own tasks, data modules and
# models, i.e. classes *defined in* a module directly under one of these subpackages and derived
# from the given base. The name is checked against this rule before anything is imported, so only
# modules of these three subpackages can ever be imported; the class itself is checked after that.
TRUSTED_PACKAGES: dict[str, str] = {
    "hypernetworks.tasks": "lightning.pytorch.LightningModule",
    "hypernetworks.data": "lightning.pytorch.LightningDataModule",
    "hypernetworks.models": "torch.nn.Module",
}
_TRUSTED_NAME = re.compile(r"^(hypernetworks\.(?:tasks|data|models))\.[a-z_][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")

# Limits checked from the archive's directory before any member is read: torch.save stores every
# member uncompressed, so a compressed member (a zip bomb: 2 GiB deflated into 2.5 MB costs ~24 s
# of CRC checking) is never a checkpoint of ours, and the CRC pass costs at most one read of the file.
MAX_MEMBERS = 200_000
MAX_TOTAL_BYTES = 64 << 30  # 64 GiB of tensors
# A download (``--ckpt_path https://...``): an overall deadline, not only a per-read timeout, and a size cap.
DOWNLOAD_DEADLINE_S = 600.0
MAX_DOWNLOAD_BYTES = 4 << 30

# What a damaged archive or stream raises while being read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError)


class CheckpointError(ValueError):
    """A checkpoint that is damaged, not a checkpoint of this project, or asks for untrusted code."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def verify_archive(file: str | os.PathLike | IO[bytes], name: str | None = None, *,
                   max_members: int = MAX_MEMBERS, max_bytes: int = MAX_TOTAL_BYTES) -> None:
    """Check that ``file`` is a complete zip archive (what ``torch.save`` writes) whose members all
    pass their CRC-32 check; raise :class:`CheckpointError` naming the file otherwise.

    Before any member is read, the archive's directory is checked: at most ``max_members`` members,
    at most ``max_bytes`` in all, and every member stored uncompressed (as ``torch.save`` writes
    them), so the check never costs more than one read of the file."""
    name = name or str(file)
    try:
        with zipfile.ZipFile(file) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise CheckpointError(f"{name} is not a checkpoint of this project: {len(infos):,} archive members "
                                      f"(more than {max_members:,}); refusing to read it")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise CheckpointError(f"{name} is not a checkpoint of this project: its members hold {total:,} bytes "
                                      f"(more than {max_bytes:,}); refusing to read it")
            packed = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
            if packed is not None:
                raise CheckpointError(
                    f"{name} is not a checkpoint of this project: archive member {packed.filename!r} is compressed "
                    f"({packed.compress_size:,} bytes unpacking to {packed.file_size:,}), and torch.save stores "
                    "members uncompressed; refusing to unpack it")
            bad = zf.testzip()  # reads every member, comparing its CRC-32 with the stored one
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"{name} is not a checkpoint of this project: not a complete zip archive as written by torch.save "
            f"(truncated, damaged, or another kind of file; {type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(
            f"{name} is damaged: archive member {bad!r} fails its CRC-32 check (the file was altered or "
            "truncated); refusing to load it")


def _torch_load(file: str | os.PathLike | IO[bytes], name: str, map_location: Any, lightning: bool) -> dict:
    import torch

    verify_archive(file, name)
    if hasattr(file, "seek"):
        file.seek(0)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False: never right for a file of unknown origin
        wanted = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"global[: ]+'?([\w.]+)", str(e))
        what = f"the Python object {wanted.group(1)}" if wanted else "Python objects"
        raise CheckpointError(
            f"{name} is not a checkpoint of this project: it asks to unpickle {what}, and checkpoints of this "
            "project hold only tensors and plain values; refusing to run code from it") from None
    except _READ_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {name}: {type(e).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or (lightning and "state_dict" not in ckpt):
        raise CheckpointError(f"{name} is not a checkpoint of this project (no 'state_dict' entry)")
    return ckpt


def _is_url(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def _copy_bounded(src: IO[bytes], dst: IO[bytes], name: str, deadline: float, max_bytes: int) -> None:
    """Copy ``src`` to ``dst`` in chunks; refuse past ``max_bytes`` or the ``deadline`` (time.monotonic)."""
    import time

    copied = 0
    read = getattr(src, "read1", src.read)  # read1: returns what has arrived, so the deadline is checked
    while True:
        if time.monotonic() > deadline:
            raise CheckpointError(f"cannot download checkpoint {name}: not complete within the deadline "
                                  f"({copied:,} bytes received); giving up")
        chunk = read(1 << 20)
        if not chunk:
            return
        copied += len(chunk)
        if copied > max_bytes:
            raise CheckpointError(f"cannot download checkpoint {name}: larger than {max_bytes:,} bytes; giving up")
        dst.write(chunk)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, timeout: float = 60.0,
                    lightning: bool = True, deadline_s: float | None = None,
                    max_download_bytes: int | None = None) -> dict:
    """Load a checkpoint dict from a local path, an ``http(s)://`` URL or another fsspec URL, after
    :func:`verify_archive`, with ``torch.load(weights_only=True)``. ``lightning=True`` also requires
    the ``state_dict`` entry of a Lightning checkpoint (``False`` for any dict that ``torch.save`` wrote,
    such as the weights file Lightning's spawn launcher passes between processes).

    A download has ``timeout`` seconds per read, ``deadline_s`` in all (default
    :data:`DOWNLOAD_DEADLINE_S`, so a server that drips bytes cannot stall a run) and at most
    ``max_download_bytes`` (default :data:`MAX_DOWNLOAD_BYTES`).

    Raises ``FileNotFoundError`` for a missing local file and :class:`CheckpointError` (a
    ``ValueError``) for everything else that is wrong with it.
    """
    import time

    name = os.fspath(path) if not isinstance(path, str) else path
    deadline = time.monotonic() + (DOWNLOAD_DEADLINE_S if deadline_s is None else deadline_s)
    max_bytes = MAX_DOWNLOAD_BYTES if max_download_bytes is None else max_download_bytes
    if not _is_url(name):
        # opened without blocking and checked on the descriptor: a FIFO or device named *.ckpt (or
        # swapped in after a check by path) is refused instead of blocking the reader forever
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise FileNotFoundError(f"checkpoint not found: {name}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {name}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                    raise FileNotFoundError(f"checkpoint not found: {name} (a directory)")
                raise CheckpointError(f"{name} is not a regular file (a pipe, socket or device); refusing to read it")
            return _torch_load(f, name, map_location, lightning)
    # Remote: copied to an anonymous temporary file (no cache that a later URL with the same file
    # name could hit), then checked and loaded like a local file.
    with tempfile.TemporaryFile() as tmp:
        try:
            if name.lower().startswith(("http://", "https://")):
                with urllib.request.urlopen(name, timeout=timeout) as resp:
                    _copy_bounded(resp, tmp, name, deadline, max_bytes)
            else:
                import fsspec

                with fsspec.open(name, "rb") as src:
                    _copy_bounded(src, tmp, name, deadline, max_bytes)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {name}") from None
        except CheckpointError:
            raise
        except (urllib.error.URLError, OSError, ValueError, ImportError) as e:
            raise CheckpointError(f"cannot download checkpoint {name}: {e}") from None
        tmp.seek(0)
        return _torch_load(tmp, name, map_location, lightning)


def _trusted(class_path: Any, trusted: Iterable[type]) -> bool:
    """Whether the *name* may be imported (no import happens here)."""
    return isinstance(class_path, str) and (
        _TRUSTED_NAME.match(class_path) is not None or class_path in {_class_name(c) for c in trusted})


def check_settings(value: Any, source: str, trusted: Iterable[type] = (), where: str = "settings") -> None:
    """Raise :class:`CheckpointError` if ``value`` holds, at any depth of its dicts and lists, a
    ``{"class_path": ...}`` spec whose name is outside :data:`TRUSTED_PACKAGES` and ``trusted``.

    Nothing is imported: only the names are compared. ``source`` (the checkpoint) and ``where``
    (the path inside its settings) go into the message.
    """
    trusted = tuple(trusted)
    if isinstance(value, dict):
        if "class_path" in value:
            class_path = value["class_path"]
            if not _trusted(class_path, trusted):
                raise CheckpointError(
                    f"{source} asks to build {class_path!r} (at {where}), which is not one of the project's task, "
                    "model or data classes; refusing to build it (a class of your own that you trust can be "
                    "passed to hypernetworks.training.load_task(..., trusted_classes=[...]))")
        for k, v in value.items():
            check_settings(v, source, trusted, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_settings(v, source, trusted, f"{where}[{i}]")
    elif isinstance(value, str) and _string_spec(value):
        # jsonargparse (LightningCLI's parser) decodes such a string (JSON or YAML, escapes and tags
        # included) into a class spec and builds it; the project's own code never decodes settings,
        # but a string that would decode to code is refused wherever it is found
        raise CheckpointError(f"{source} holds a class spec written as a string (at {where}): {value[:80]!r}; "
                              "refusing to load it")


def _has_spec_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(isinstance(k, str) and k.strip() in ("class_path", "__path__", "_class_path") or _has_spec_key(v)
                   for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_spec_key(v) for v in value)
    return False


def _string_spec(text: str) -> bool:
    """Whether ``text`` is, or decodes (as JSON or YAML, with their escapes) to, a class spec or a
    YAML object tag."""
    import json

    import yaml

    if "class_path" in text or re.search(r"!!?python|!!\s*python|tag:yaml\.org,2002:python", text):
        return True
    if not re.search(r"[{}\[\]:!&*]", text):  # nothing a decoder could turn into a mapping or a tag
        return False
    for decode in (json.loads, yaml.safe_load):
        try:
            decoded = decode(text)
        except yaml.constructor.ConstructorError as e:
            if "python" in str(e):  # a python object tag that safe_load refuses
                return True
            continue
        except Exception:
            continue
        if _has_spec_key(decoded) or (isinstance(decoded, str) and decoded != text and _string_spec(decoded)):
            return True
    return False


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _check_plain(value: Any, source: str, where: str, depth: int = 0) -> None:
    """Settings are data: None, bool, int, float, str, and lists/dicts (string keys) of those."""
    if depth > 32:
        raise CheckpointError(f"{source}: saved setting {where} is nested more than 32 levels deep")
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, source, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{source}: saved setting {where} has a key of type {type(k).__name__}")
            _check_plain(v, source, f"{where}.{k}", depth + 1)
        return
    raise CheckpointError(f"{source}: saved setting {where} is a {type(value).__name__}, not a plain value "
                          "(numbers, strings, lists and dicts of those)")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether the plain ``value`` fits the annotation ``hint`` (lenient for hints it does not know)."""
    import collections.abc
    import types
    import typing

    if hint is Any or hint is inspect.Parameter.empty or hint is object:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if hint is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return not args or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return isinstance(value, str)
    return True


def checkpoint_settings(cls: type, hparams: dict[str, Any], source: str = "checkpoint",
                        trusted: Iterable[type] = ()) -> dict[str, Any]:
    """The settings a checkpoint saved for ``cls``, as data, checked against its signature.

    LightningCLI's bookkeeping (``_class_path``, ``_instantiator``) and names ``cls`` no longer
    takes are dropped; every value must be plain (numbers, strings, lists and dicts of those),
    must fit its parameter's annotation, and no string may be, or decode to, a class spec. Nested
    ``{"class_path": ...}`` dicts must name allow-listed classes (:func:`check_settings`). Raises
    :class:`CheckpointError` naming the file and the setting.
    """
    import typing

    if not isinstance(hparams, dict):
        raise CheckpointError(f"{source}: its saved settings are a {type(hparams).__name__}, not a dict")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: check the values without it
        hints = {}
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: its saved settings have a key of type {type(key).__name__}")
        if key in ("_class_path", "_instantiator") or (key not in params and not takes_kwargs):
            continue
        _check_plain(value, source, key)
        check_settings(value, source, trusted, where=key)
        hint = hints.get(key, inspect.Parameter.empty)
        if not _conforms(value, hint):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CheckpointError(f"{source}: saved setting {key}={shown} does not fit {cls.__name__}'s "
                                  f"parameter {key}: {getattr(hint, '__name__', None) or hint}")
        out[key] = value
    return out


def check_weights_fit(cls: type, settings: dict[str, Any], state_dict: dict[str, Any], source: str = "checkpoint",
                      trusted: Iterable[type] = (), slack: float = 2.0) -> None:
    """Build ``cls(**settings)`` on the meta device (no memory) and check that its parameters and
    buffers have the shapes of the checkpoint's ``state_dict``, so that settings which do not
    match the weights (a hidden size of 10**6 beside a small model, say) are refused before anything
    is allocated. A model whose state is built later (``setup``) is checked by its size only."""
    import torch

    try:
        with torch.device("meta"):
            probe = build_from_settings(cls, settings, source=source, trusted=trusted)
    except CheckpointError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{source}: its saved settings do not build a {cls.__name__}: "
                              f"{type(e).__name__}: {first}") from None
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items() if isinstance(v, torch.Tensor)}
    saved = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for key, shape in expected.items():
        if key in saved and saved[key] != shape:
            raise CheckpointError(f"{source}: its saved settings build {key} with shape {list(shape)}, but the "
                                  f"saved weights have {list(saved[key])}; the file is inconsistent")
    n_expected = sum(math.prod(s) for s in expected.values())
    n_saved = sum(math.prod(s) for s in saved.values())
    if n_expected > slack * n_saved + (1 << 20):
        raise CheckpointError(f"{source}: its saved settings build a model of {n_expected:,} values, but the file "
                              f"holds {n_saved:,}; the file is inconsistent")


def resolve_trusted_class(class_path: str, trusted: Iterable[type] = (), source: str = "checkpoint") -> type:
    """Import and return ``class_path`` if it is one of ``trusted`` or one of the project's own
    classes (see :data:`TRUSTED_PACKAGES`); raise :class:`CheckpointError` otherwise."""
    for cls in trusted:
        if _class_name(cls) == class_path:
            return cls
    m = _TRUSTED_NAME.match(class_path) if isinstance(class_path, str) else None
    if m is None:  # check_settings ran first; this is a second lock before the import
        raise CheckpointError(f"{source}: {class_path!r} is not one of the project's task, model or data classes")
    module_name, _, name = class_path.rpartition(".")
    base_module, _, base_name = TRUSTED_PACKAGES[m.group(1)].rpartition(".")
    base = getattr(importlib.import_module(base_module), base_name)
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"{source} asks for {class_path!r}, which does not exist in this version of the "
                              "package") from None
    # a name imported into one of our modules (torch's DataLoader, say) is not ours
    if not (inspect.isclass(cls) and cls.__module__ == module_name and issubclass(cls, base)):
        raise CheckpointError(f"{source} asks to build {class_path!r}, which is not a {base_name} defined in "
                              f"{module_name}; refusing to build it")
    return cls


def _materialize(value: Any, trusted: tuple[type, ...], source: str) -> Any:
    if isinstance(value, dict):
        if "class_path" in value:
            cls = resolve_trusted_class(value["class_path"], trusted, source)
            return build_from_settings(cls, dict(value.get("init_args") or {}), source=source, trusted=trusted)
        return {k: _materialize(v, trusted, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, trusted, source) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v, trusted, source) for v in value)
    return value  # strings stay strings: never parsed as specs


def build_from_settings(cls: type, settings: dict[str, Any], *, source: str = "settings",
                        trusted: Iterable[type] = ()) -> Any:
    """``cls(**settings)``, with nested ``{"class_path", "init_args"}`` specs built as objects.

    Every spec is checked by :func:`check_settings` before anything is imported or built. Settings
    that ``cls`` no longer accepts (an older checkpoint) are dropped unless it takes ``**kwargs``.
    """
    trusted = tuple(trusted)
    check_settings(settings, source, trusted)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        settings = {k: v for k, v in settings.items() if k in params}
    return cls(**{k: _materialize(v, trusted, source) for k, v in settings.items()})
