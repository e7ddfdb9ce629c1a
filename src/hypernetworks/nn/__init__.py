"""The paper's ideas as plain torch modules: no training code, no I/O."""
from hypernetworks.nn.hyper_lstm import (CELL_KINDS, HyperLSTM, HyperLSTMCell, HyperRNN, HyperRNNCell,
                                         WeightScaling, build_recurrent, gate_change_intensity)
from hypernetworks.nn.lstm import GATES, LSTM, LSTMCell

__all__: list[str] = [
    "HyperLSTM", "HyperLSTMCell", "HyperRNN", "HyperRNNCell", "WeightScaling", "LSTM", "LSTMCell",
    "build_recurrent", "gate_change_intensity", "CELL_KINDS", "GATES",
]
from hypernetworks.nn.static import (  # noqa: E402  (static hypernetworks for CNNs)
    HyperConv2d, KernelGenerator, batched_kernels, generate_kernels, materialise, parameter_report,
)
__all__ += ["KernelGenerator", "HyperConv2d", "batched_kernels", "generate_kernels", "materialise",
            "parameter_report"]
from hypernetworks.nn.hyperize import hyperize  # noqa: E402  (any model's layers generated)
__all__ += ["hyperize"]
from hypernetworks.nn.channels import (  # noqa: E402  (channel-adaptive first layers)
    ChannelHyperPatchEmbed, channel_subsets, sample_channels,
)
__all__ += ["ChannelHyperPatchEmbed", "sample_channels", "channel_subsets"]
