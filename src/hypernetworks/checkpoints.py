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
import os
import pickle
import re
import shutil
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

# What a damaged archive or stream raises while being read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError)


class CheckpointError(ValueError):
    """A checkpoint that is damaged, not a checkpoint of this project, or asks for untrusted code."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def verify_archive(file: str | os.PathLike | IO[bytes], name: str | None = None) -> None:
    """Check that ``file`` is a complete zip archive (what ``torch.save`` writes) whose members all
    pass their CRC-32 check; raise :class:`CheckpointError` naming the file otherwise."""
    name = name or str(file)
    try:
        with zipfile.ZipFile(file) as zf:
            bad = zf.testzip()  # reads every member, comparing its CRC-32 with the stored one
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


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, timeout: float = 60.0,
                    lightning: bool = True) -> dict:
    """Load a checkpoint dict from a local path, an ``http(s)://`` URL or another fsspec URL, after
    :func:`verify_archive`, with ``torch.load(weights_only=True)``. ``lightning=True`` also requires
    the ``state_dict`` entry of a Lightning checkpoint (``False`` for any dict that ``torch.save`` wrote,
    such as the weights file Lightning's spawn launcher passes between processes).

    Raises ``FileNotFoundError`` for a missing local file and :class:`CheckpointError` (a
    ``ValueError``) for everything else that is wrong with it.
    """
    name = os.fspath(path) if not isinstance(path, str) else path
    if not _is_url(name):
        if not Path(name).is_file():
            raise FileNotFoundError(f"checkpoint not found: {name}")
        return _torch_load(name, name, map_location, lightning)
    # Remote: copied to an anonymous temporary file (no cache that a later URL with the same file
    # name could hit), then checked and loaded like a local file.
    with tempfile.TemporaryFile() as tmp:
        try:
            if name.lower().startswith(("http://", "https://")):
                with urllib.request.urlopen(name, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, tmp)
            else:
                import fsspec

                with fsspec.open(name, "rb") as src:
                    shutil.copyfileobj(src, tmp)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {name}") from None
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
    elif isinstance(value, str) and "class_path" in value:
        # jsonargparse (LightningCLI's parser) parses such a string into a class spec and builds it
        raise CheckpointError(f"{source} holds a class spec written as a string (at {where}): {value[:80]!r}; "
                              "refusing to load it")


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
