"""A timm-style model registry: ``create_model(name, **overrides)`` and ``list_models()``.

Model modules register factories with ``@register_model("name")``; the registry imports the
known model modules on first use so that every name is discoverable without imports by the user.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
from typing import Callable

import torch.nn as nn

# Modules that define registered models. Imported lazily, in this order.
_MODEL_MODULES = (
    "hypernetworks.models.mnist",
    "hypernetworks.models.wrn",
    "hypernetworks.models.char_lm",
    "hypernetworks.models.handwriting",
    "hypernetworks.models.seq2seq",
    "hypernetworks.models.vit",
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_loaded = False


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a model family not present in this build
            if e.name != mod:
                raise
    _loaded = True


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a glob pattern (``"*wrn*"``)."""
    _load_all()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _normalise(name: str) -> str:
    """Lower case, letters and digits only: "HyperWRN_40-2" and "hyper-wrn-40-2" compare equal."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def close_matches(name: str, n: int = 5) -> list[str]:
    """Registered names close to ``name``: equal once normalised (case, ``-``/``_``/spaces ignored)
    first, then difflib's closest normalised names."""
    _load_all()
    by_norm: dict[str, list[str]] = {}
    for registered in sorted(_REGISTRY):
        by_norm.setdefault(_normalise(registered), []).append(registered)
    key = _normalise(name)
    keys = difflib.get_close_matches(key, list(by_norm), n=n, cutoff=0.75)
    if key in by_norm and key not in keys:
        keys.insert(0, key)
    return [m for k in keys for m in by_norm[k]][:n]


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; keyword overrides go to its factory."""
    _load_all()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        close = close_matches(name)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see hypernetworks.list_models())")
    return _REGISTRY[name](**overrides)
