"""The model registry and the command-line dispatcher."""
from __future__ import annotations

import pytest
import torch.nn as nn

import hypernetworks
from hypernetworks import cli, create_model, list_models, register_model

REQUIRED = ["mnist-conv", "mnist-hyper", "wrn-40-1", "wrn-40-2", "hyper-wrn-40-1", "hyper-wrn-40-2",
            "ptb-lstm-1000", "ptb-hyperlstm", "ptb-ln-hyperlstm", "enwik8-ln-hyperlstm-2048"]


def test_required_models_are_registered_and_filterable():
    names = list_models()
    assert names == sorted(names)
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, missing
    assert set(list_models("*wrn*")) >= {"wrn-40-1", "hyper-wrn-40-2"}
    assert all("wrn" in n for n in list_models("*wrn*"))


def test_create_model_passes_overrides_and_rejects_unknown_names():
    small = create_model("mnist-hyper")
    assert isinstance(small, nn.Module)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        create_model("no-such-model")
    with pytest.raises(TypeError, match="model name must be a str"):
        create_model(3)


@pytest.mark.parametrize("typo, expected", [
    ("hyperwrn-40-2", "hyper-wrn-40-2"),  # normalised names are equal: suggested first
    ("HyperWRN_40_2", "hyper-wrn-40-2"),
    ("wrn402", "wrn-40-2"),
    ("ptb-hyper-lstm", "ptb-hyperlstm"),
    ("mnist-hyperr", "mnist-hyper"),  # one letter off
])
def test_unknown_names_suggest_close_registered_ones(typo, expected):
    with pytest.raises(ValueError, match=f"did you mean '{expected}'") as info:
        create_model(typo)
    assert "list_models" in str(info.value)
    assert hypernetworks.models.registry.close_matches(typo)[0] == expected


def test_no_suggestion_for_a_name_like_nothing():
    with pytest.raises(ValueError) as info:
        create_model("qqqq")
    assert "did you mean" not in str(info.value)


def test_registering_a_name_twice_is_refused():
    @register_model("test-only-model")
    def factory(**kw):
        return nn.Linear(1, 1)

    assert isinstance(create_model("test-only-model"), nn.Linear)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("test-only-model")(lambda **kw: nn.Linear(2, 2))


def test_top_level_exports():
    for name in ("HyperLSTM", "HyperLSTMCell", "LSTM", "HyperRNNCell", "create_model", "list_models"):
        assert hasattr(hypernetworks, name), name


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "demo" in out and "serve" in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_every_listed_command_module_has_a_main():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{name}: {module}.main missing"
