"""HyperNetworks (Ha, Dai and Le, 2016) in PyTorch.

    from hypernetworks import HyperLSTM            # drop-in for torch.nn.LSTM
    from hypernetworks import create_model, list_models

The names below are imported on first use (PEP 562), so that ``import hypernetworks.cli`` and
``hypernetworks --help`` answer without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: the layers (hypernetworks.nn, the package's front door); tests/test_registry_cli.py checks that
#: this list equals hypernetworks.nn.__all__
_NN = (
    "HyperLSTM", "HyperLSTMCell", "HyperRNN", "HyperRNNCell", "WeightScaling", "LSTM", "LSTMCell",
    "build_recurrent", "gate_change_intensity", "CELL_KINDS", "GATES",
    "KernelGenerator", "HyperConv2d", "batched_kernels", "generate_kernels", "materialise", "parameter_report",
    "hyperize",
    "ChannelHyperPatchEmbed", "sample_channels", "channel_subsets",
)
_REGISTRY = ("create_model", "list_models", "register_model")

__all__ = [*_NN, *_REGISTRY]


def __getattr__(name: str) -> Any:
    if name in _NN:
        value = getattr(importlib.import_module("hypernetworks.nn"), name)
    elif name in _REGISTRY:
        value = getattr(importlib.import_module("hypernetworks.models.registry"), name)
    else:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a subpackage, e.g. hypernetworks.data
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
