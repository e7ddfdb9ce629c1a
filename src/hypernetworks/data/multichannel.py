"""Former home of the multi-channel imaging datasets, kept so that old imports, recipes and
checkpoints still work. The code now lives one file per dataset, as torchvision lays out its
datasets:

* ``hypernetworks.data.so2sat``  -- So2Sat LCZ42 (version 2, city split): ``So2SatLCZ42``, ``So2SatDataModule``
* ``hypernetworks.data.chammi``  -- CHAMMI: ``CHAMMI``, ``CHAMMIDataModule``, ``SubDatasetBatchSampler``, ...
* ``hypernetworks.data.jumpcp``  -- JUMP-CP: ``JUMPCP``, ``JUMPCPDataModule``, ...
* ``hypernetworks.data.channel_utils`` -- ``ChannelNormalize``, ``channel_stats``, ``ResizeTo``
* ``hypernetworks.tasks.chammi_metrics`` -- CHAMMI's scoring (``chammi_benchmark``, ``chammi_aggregate``)

Everything is re-exported here. The three data modules are also defined here as thin subclasses,
so that a recipe or checkpoint naming ``hypernetworks.data.multichannel.<Name>DataModule`` (the
checkpoint loader only builds classes *defined* in the module it names) still resolves; new
recipes name the new modules.
"""
from __future__ import annotations

from hypernetworks.data import chammi as _chammi
from hypernetworks.data import jumpcp as _jumpcp
from hypernetworks.data import so2sat as _so2sat
from hypernetworks.data.channel_utils import ChannelNormalize, ResizeTo, _ResizeTo, channel_stats  # noqa: F401
from hypernetworks.data.chammi import (CHAMMI, CHAMMI_CHANNELS, CHAMMI_SPLITS, CHAMMI_TASKS,  # noqa: F401
                                       SubDatasetBatchSampler, collate_channels, download_chammi, fold_strip,
                                       in_split)
from hypernetworks.data.jumpcp import (JUMPCP, JUMPCP_CHANNELS, JUMPCP_METADATA, download_jumpcp,  # noqa: F401
                                       jumpcp_split, jumpcp_well_labels)
from hypernetworks.data.so2sat import (SO2SAT_CHANNELS, SO2SAT_CLASSES, SO2SAT_METADATA, SO2SAT_VERSION,  # noqa: F401
                                       So2SatLCZ42, download_so2sat)
from hypernetworks.tasks.chammi_metrics import CHAMMI_LEAVE_OUT, chammi_aggregate, chammi_benchmark  # noqa: F401

__all__ = [
    "So2SatLCZ42", "CHAMMI", "JUMPCP", "ChannelNormalize", "SubDatasetBatchSampler", "collate_channels",
    "So2SatDataModule", "CHAMMIDataModule", "JUMPCPDataModule",
    "SO2SAT_CHANNELS", "SO2SAT_METADATA", "SO2SAT_CLASSES", "CHAMMI_CHANNELS", "JUMPCP_CHANNELS", "JUMPCP_METADATA",
    "download_so2sat", "download_chammi", "download_jumpcp", "fold_strip", "chammi_benchmark", "in_split",
]


class So2SatDataModule(_so2sat.So2SatDataModule):
    """Old name of ``hypernetworks.data.so2sat.So2SatDataModule`` (same class otherwise)."""


class CHAMMIDataModule(_chammi.CHAMMIDataModule):
    """Old name of ``hypernetworks.data.chammi.CHAMMIDataModule`` (same class otherwise)."""


class JUMPCPDataModule(_jumpcp.JUMPCPDataModule):
    """Old name of ``hypernetworks.data.jumpcp.JUMPCPDataModule`` (same class otherwise)."""
