"""HyperNetworks (Ha, Dai and Le, 2016) in PyTorch.

    from hypernetworks import HyperLSTM            # drop-in for torch.nn.LSTM
    from hypernetworks import create_model, list_models
"""
from hypernetworks.nn import *  # noqa: F401,F403  (the layers are the package's front door)
from hypernetworks.nn import __all__ as _nn_all
from hypernetworks.models.registry import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = [*_nn_all, "create_model", "list_models", "register_model"]
