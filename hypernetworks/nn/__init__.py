"""The paper's ideas as plain torch modules: no training code, no I/O."""
from hypernetworks.nn.hyper_lstm import (CELL_KINDS, HyperLSTM, HyperLSTMCell, HyperRNN, HyperRNNCell,
                                         WeightScaling, build_recurrent, gate_change_intensity)
from hypernetworks.nn.lstm import GATES, LSTM, LSTMCell

__all__: list[str] = [
    "HyperLSTM", "HyperLSTMCell", "HyperRNN", "HyperRNNCell", "WeightScaling", "LSTM", "LSTMCell",
    "build_recurrent", "gate_change_intensity", "CELL_KINDS", "GATES",
]
