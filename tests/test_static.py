"""Static hypernetworks: generator equations, tiling, batching, gradients, counts, materialise."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hypernetworks import create_model
from hypernetworks.commands import params as params_cmd
from hypernetworks.nn.static import (HyperConv2d, KernelGenerator, TiledWeight, batched_kernels, generate_kernels,
                                     materialise, parameter_report)


def _tiled(model: nn.Module) -> list[TiledWeight]:
    return [m for m in model.modules() if isinstance(m, TiledWeight)]


def _reference_kernel(g: KernelGenerator, z: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out per input channel i: K_i = W_out (W_i z + B_i) + B_out."""
    f = g.kernel_size
    slices = []
    for i in range(g.in_size):
        a_i = g.w_in[i] @ z + g.b_in[i]
        k_i = g.w_out @ a_i + g.b_out  # (N_out f f)
        slices.append(k_i.view(g.out_size, f, f))
    return torch.stack(slices, dim=1)  # (N_out, N_in, f, f)


def test_generator_follows_the_papers_equations_and_shapes():
    torch.manual_seed(0)
    g = KernelGenerator(embedding_size=3, in_size=4, out_size=5, kernel_size=3, hidden_size=6)
    for p in g.parameters():  # non-zero biases too, so that every term is checked
        nn.init.normal_(p)
    z = torch.randn(7, 3)
    k = g(z)
    assert k.shape == (7, 5, 4, 3, 3)
    for t in range(7):
        torch.testing.assert_close(k[t], _reference_kernel(g, z[t]))
    assert g(torch.randn(2, 3, 3)).shape == (2, 3, 5, 4, 3, 3)  # any leading dims
    with pytest.raises(ValueError, match="embedding_size"):
        g(torch.randn(2, 4))


def test_generator_parameter_count_formula():
    nz, nin, d, nout, f = 4, 16, 4, 16, 7
    g = KernelGenerator(nz, nin, nout, f)
    assert g.hidden_size == nz  # d = N_z by default
    assert sum(p.numel() for p in g.parameters()) == nz * nin * d + nin * d + d * nout * f * f + nout * f * f == 4240


def test_tiling_order_each_tile_uses_its_own_embedding():
    torch.manual_seed(0)
    g = KernelGenerator(5, in_size=2, out_size=3, kernel_size=3)
    conv = HyperConv2d(6, 9, 3, g, padding=1)  # 3 out tiles x 3 in tiles
    assert conv.z.shape == (3, 3, 5)
    k = conv.kernel()
    assert k.shape == (9, 6, 3, 3)
    for o in range(3):
        for i in range(3):
            torch.testing.assert_close(k[3 * o:3 * o + 3, 2 * i:2 * i + 2], g(conv.z[o, i]))
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, k, padding=1))


def test_sizes_that_are_not_multiples_of_the_basic_tile_are_refused():
    g = KernelGenerator(4, 16, 16, 3)
    with pytest.raises(ValueError, match="multiples of the generator's basic size"):
        HyperConv2d(24, 32, 3, g)
    with pytest.raises(ValueError, match="multiples"):
        HyperConv2d(16, 40, 3, g)
    with pytest.raises(ValueError, match="kernel_size"):
        HyperConv2d(16, 16, 5, g)
    with pytest.raises(ValueError, match=r"'block1.0.conv1' \(Conv2d, weight \(16, 16, 3, 3\)\) cannot be made of 24x24"):
        create_model("hyper-wrn-40-1", base=24)


def test_all_tiles_of_all_layers_are_generated_in_one_call_per_step():
    torch.manual_seed(0)
    model = create_model("hyper-wrn-40-1")
    layers = _tiled(model)
    assert len(layers) == 36 and {id(t.generator) for t in layers} == {id(layers[0].generator)}
    calls = []
    layers[0].generator.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [sum(m.num_tiles for m in layers)] == [242]
    # the batched kernels equal each layer's own (unbatched) kernel
    calls.clear()
    for layer, w in zip(layers, generate_kernels(layers)):
        torch.testing.assert_close(w, layer.kernel())
    assert len(calls) == 1 + len(layers)
    assert all(m._weight is None for m in layers)  # nothing left over after the step


def test_gradcheck_generator_and_hyperconv_at_tiny_sizes():
    torch.manual_seed(0)
    g = KernelGenerator(2, in_size=2, out_size=2, kernel_size=3, hidden_size=3).double()
    conv = HyperConv2d(4, 2, 3, g, padding=1, bias=True).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.double)

    # torch.func.functional_call over the layer and its (unregistered) generator
    def fn(z, w_in, b_in, w_out, b_out):
        tiles = torch.func.functional_call(g, {"w_in": w_in, "b_in": b_in, "w_out": w_out, "b_out": b_out},
                                           (z.reshape(-1, 2),))
        return nn.functional.conv2d(x, conv.assemble(tiles), conv.bias, padding=1)

    inputs = tuple(t.detach().clone().requires_grad_() for t in (conv.z, g.w_in, g.b_in, g.w_out, g.b_out))
    assert torch.autograd.gradcheck(fn, inputs)
    # and the module path agrees with the functional one
    torch.testing.assert_close(conv(x), fn(*inputs))


def test_gradients_reach_embeddings_and_generator_in_a_model():
    torch.manual_seed(0)
    model = create_model("mnist-hyper")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    gen = "conv2.parametrizations.weight.0.own_generator."
    for name in (gen + "w_in", gen + "b_in", gen + "w_out", gen + "b_out", "conv2.parametrizations.weight.0.z"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_parameter_counts_match_the_paper_and_the_architecture():
    # MNIST: the conventional second layer stores 12,544 weights, the hypernetwork 4,244.
    conv = create_model("mnist-conv")
    assert conv.conv2.weight.numel() == 12_544
    hyper = parameter_report(create_model("mnist-hyper"))
    assert hyper["generator"] + hyper["embeddings"] == 4_244
    assert hyper["generated"] == 12_544
    assert hyper["total"] == parameter_report(conv)["total"] - 12_544 + 4_244

    # WRN: paper 0.563M (40-1) and 2.236M (40-2).
    w1, w2 = parameter_report(create_model("wrn-40-1")), parameter_report(create_model("wrn-40-2"))
    assert w1["total"] == 563_930 and abs(w1["total"] / 0.563e6 - 1) < 0.002
    conv_weights = sum(m.weight.numel() for m in create_model("wrn-40-2").modules() if isinstance(m, nn.Conv2d))
    assert conv_weights == 2_236_848  # the paper's 2.236M; all parameters: 2,243,546
    assert w2["total"] == 2_243_546

    # Hyper WRN: generator (N_z = d = 64, 16x16x3x3) + 64 numbers per tile + the ordinary layers.
    gen = 64 * 16 * 64 + 16 * 64 + 64 * 16 * 9 + 16 * 9
    for k, wr in ((1, w1), (2, w2)):
        model = create_model(f"hyper-wrn-40-{k}")
        r = parameter_report(model)
        tiles = sum(t.weight_shape[0] * t.weight_shape[1] // 256 for t in _tiled(model))
        assert len(_tiled(model)) == 36
        assert r["generator"] == gen == 75_920
        assert r["embeddings"] == 64 * tiles
        assert r["ordinary"] == wr["total"] - r["generated"]  # everything not generated stays as it was
        assert r["total"] == r["generator"] + r["embeddings"] + r["ordinary"]
    assert parameter_report(create_model("hyper-wrn-40-2"))["total"] == 155_626
    assert parameter_report(create_model("hyper-wrn-40-1"))["total"] == 97_770


def test_a_shared_generator_is_counted_once_and_saved_once():
    g = KernelGenerator(4, 8, 8, 3)
    model = nn.Sequential(HyperConv2d(8, 16, 3, g), nn.ReLU(), HyperConv2d(16, 8, 3, g))
    r = parameter_report(model)  # the generator is not registered in the Sequential: still counted
    assert r["generator"] == sum(p.numel() for p in g.parameters())
    assert r["embeddings"] == 4 * (2 + 2)
    wrn = create_model("hyper-wrn-40-1")
    assert sum(".own_generator." in k for k in wrn.state_dict()) == 4  # held (and saved) by one layer
    clone = copy.deepcopy(wrn)  # deep copies keep one shared generator, the copy's own
    assert len({id(t.generator) for t in _tiled(clone)}) == 1
    assert clone.block1[0].conv1.parametrizations.weight[0].own_generator is _tiled(clone)[5].generator


def _calibrate_bn(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()


@pytest.mark.parametrize("width", [1, 2])
def test_materialised_model_equals_the_hypernetwork_and_loads_into_the_twin(width):
    torch.manual_seed(0)
    hyper = create_model(f"hyper-wrn-40-{width}")
    _calibrate_bn(hyper)
    plain = materialise(hyper)
    assert not any(isinstance(m, (TiledWeight, KernelGenerator)) for m in plain.modules())
    assert type(plain.block2[0].conv1) is nn.Conv2d and type(plain) is type(twin := create_model(f"wrn-40-{width}"))
    assert len(_tiled(hyper)) == 36  # the original is untouched
    twin.eval()
    twin.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hyper(x)
        torch.testing.assert_close(plain(x), expected)
        torch.testing.assert_close(twin(x), expected)
    assert parameter_report(plain)["total"] == parameter_report(twin)["total"]


def test_materialise_mnist_and_a_standalone_layer():
    torch.manual_seed(0)
    hyper = create_model("mnist-hyper")
    twin = create_model("mnist-conv")
    twin.load_state_dict(materialise(hyper).state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(twin(x), hyper(x))
    layer = HyperConv2d(8, 16, 3, padding=1, embedding_size=2)  # owns a private generator
    conv = materialise(layer)
    assert type(conv) is nn.Conv2d
    torch.testing.assert_close(conv(torch.ones(1, 8, 5, 5)), layer(torch.ones(1, 8, 5, 5)))


def test_batched_kernels_is_reentrant_and_cleans_up_after_errors():
    model = create_model("mnist-hyper")
    tiled = model.conv2.parametrizations.weight[0]
    with batched_kernels(model):
        w = tiled._weight
        with batched_kernels(model):  # nested: reuses the outer kernels
            assert tiled._weight is w
        model(torch.zeros(1, 1, 28, 28))  # the model's own batching hook leaves them alone
        assert tiled._weight is w
    assert tiled._weight is None
    with pytest.raises(RuntimeError):
        with batched_kernels(model):
            raise RuntimeError("boom")
    assert tiled._weight is None
    with pytest.raises(RuntimeError):  # an error inside the model's forward: kernels released too
        model(torch.zeros(1, 2, 28, 28))
    assert tiled._weight is None


def test_params_command_prints_every_model(capsys):
    assert params_cmd.main(["*mnist*"]) == 0
    out = capsys.readouterr().out
    assert "mnist-conv" in out and "mnist-hyper" in out
    row = next(line for line in out.splitlines() if line.startswith("mnist-hyper"))
    assert "12,910" in row and "4,240" in row and "12,544" in row
    assert params_cmd.main(["wrn-40-*", "--millions"]) == 0
    out = capsys.readouterr().out
    assert "0.564M" in out and "2.244M" in out
    assert params_cmd.main(["no-such-model*"]) == 1


def test_both_counting_conventions_give_the_papers_hyper_wrn_figures(capsys):
    # every parameter: 97,770 and 155,626; counted as the paper's plain 0.563M / 2.236M are
    # (our plain nets have 930 / 7,546 more, all in layers ordinary in both twins): 96,840 / 148,080,
    # which the paper prints as 0.097M and 0.148M
    for width, paper_plain, expected in ((1, 563_000, 96_840), (2, 2_236_000, 148_080)):
        r = parameter_report(create_model(f"hyper-wrn-40-{width}"), plain_count=paper_plain)
        assert r["plain_convention"] == paper_plain - r["generated"] + r["generator"] + r["embeddings"] == expected
    assert params_cmd.main(["hyper-wrn-40-*", "--millions"]) == 0
    out = capsys.readouterr().out
    assert "paper convention" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["hyper-wrn-40-1"][-1] == "0.097M" and rows["hyper-wrn-40-2"][-1] == "0.148M"
    assert rows["hyper-wrn-40-1"][1] == "0.098M" and rows["hyper-wrn-40-2"][1] == "0.156M"  # every parameter


def test_kernel_mosaic_layout():
    import numpy as np

    from hypernetworks.viz.kernels import kernel_mosaic

    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    img = kernel_mosaic(w)
    assert img.shape == (2 * 3 - 1, 3 * 3 - 1)  # 1-pixel gaps between cells
    np.testing.assert_array_equal(img[3:5, 6:8], w[1, 2].numpy())  # row = output, column = input
    assert np.isnan(img[2]).all() and np.isnan(img[:, 2]).all()
    assert kernel_mosaic(w, max_out=1, max_in=2).shape == (2, 5)
    with pytest.raises(ValueError, match="out, in, f, f"):
        kernel_mosaic(torch.zeros(3))
    np.testing.assert_array_equal(kernel_mosaic(w[:, :, 0, 0]), w[:, :, 0, 0].numpy())  # a Linear weight
    assert kernel_mosaic(w[:, :, 0]).shape == (2 * 2 - 1, 3 * 3 - 1)  # Conv1d: 1 x k cells


def test_state_dicts_of_the_earlier_hyperconv2d_models_still_load():
    """mnist-hyper and hyper-wrn-40-k were built from HyperConv2d layers and a ``generator``
    attribute before they were made with hyperize; their checkpoints load into the new models."""
    torch.manual_seed(0)

    class EarlierMNIST(nn.Module):  # the earlier mnist-hyper's layout
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 7, padding=3)
            self.generator = KernelGenerator(4, 16, 16, 7)
            self.conv2 = HyperConv2d(16, 16, 7, self.generator, padding=3, bias=True)
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc(x.flatten(1))

    old = EarlierMNIST()
    for p in old.generator.parameters():
        nn.init.normal_(p, std=0.1)
    new = create_model("mnist-hyper")
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(new(x), old(x))
    plain = materialise(new)  # the renaming hook is for the hypernetwork only
    assert not plain._load_state_dict_pre_hooks
    create_model("mnist-conv").load_state_dict(plain.state_dict(), strict=True)
    # hyper-wrn: every 3x3 residual conv's z and the shared generator
    wrn = create_model("hyper-wrn-40-1")
    sd = {k: v.clone() for k, v in wrn.state_dict().items()}
    earlier = {}
    for k, v in sd.items():
        if ".parametrizations.weight.0.own_generator." in k:
            earlier["generator." + k.rsplit(".", 1)[1]] = v + 1
        elif k.endswith(".parametrizations.weight.0.z"):
            earlier[k.replace(".parametrizations.weight.0.z", ".z")] = v + 1
        else:
            earlier[k] = v
    wrn.load_state_dict(earlier, strict=True)
    assert torch.equal(wrn.block3[5].conv2.parametrizations.weight[0].z, earlier["block3.5.conv2.z"])
    assert torch.equal(wrn.block1[0].conv1.parametrizations.weight[0].own_generator.w_in, earlier["generator.w_in"])

def test_hyperconv2d_starts_at_kaiming_std_for_its_real_fan_in():
    torch.manual_seed(0)
    g = KernelGenerator(64, 16, 16, 3)
    for cin in (16, 64, 128):
        w = HyperConv2d(cin, 32, 3, g).kernel().detach()
        assert abs(w.std().item() / (2.0 / (cin * 9)) ** 0.5 - 1) < 0.25, cin
