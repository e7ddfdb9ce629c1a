"""hyperize(model) on models the project did not write, and materialise back."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from hypernetworks import create_model, hyperize, materialise, parameter_report
from hypernetworks.nn.static import HyperConv2d, KernelGenerator, TiledWeight


class SmallCNN(nn.Module):
    """A hand-written CNN, as a user would have it (torch's default initialisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.features = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(F.relu(self.stem(x))).mean((2, 3)))


class TinyTransformer(nn.Module):
    """A model built from torch.nn blocks: embedding, nn.TransformerEncoder, linear head."""

    def __init__(self, vocab: int = 12, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def _tiled(model: nn.Module) -> list[TiledWeight]:
    return [m for m in model.modules() if isinstance(m, TiledWeight)]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_hand_written_cnn_report_training_and_materialise():
    torch.manual_seed(0)
    original = SmallCNN()
    hyper = hyperize(original, embedding_size=8)
    assert type(hyper) is SmallCNN and hyper is not original and not _tiled(original)  # a copy by default
    report = hyper.hyperize_report
    assert report.generated == ["features.0.weight", "features.3.weight"]
    assert report.ordinary == {"stem.weight": "in_channels/groups 3 is not a multiple of 16",
                               "head.weight": "out_features 10 is not a multiple of 16"}
    assert "2x1 tiles of 16x16x3x3" in str(report) and "1 generator" not in str(report)
    assert isinstance(hyper.features[0], nn.Conv2d)  # same classes, same forward

    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    first, last = _train(hyper, x, y, steps=25, lr=1e-2)
    assert last < 0.5 * first, (first, last)

    hyper.eval()
    plain = materialise(hyper)
    assert type(plain) is SmallCNN and type(plain.features[0]) is nn.Conv2d
    assert not _tiled(plain) and not any(isinstance(m, KernelGenerator) for m in plain.modules())
    assert not plain._forward_pre_hooks and not plain._forward_hooks and not hasattr(plain, "hyperize_report")
    fresh = SmallCNN()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), hyper(x))
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert _tiled(hyper)  # the hypernetwork itself is untouched and still works
    hyper(x)


def test_transformer_encoder_trains_and_materialises():
    torch.manual_seed(0)
    hyper = hyperize(TinyTransformer(), embedding_size=8)
    report = hyper.hyperize_report
    # attention in_proj (96 x 32), out_proj, linear1, linear2 of both layers; the head (12 x 32)
    # and the embedding table stay ordinary, with reasons
    assert sorted(report.generated) == sorted(f"encoder.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"))
    assert "is not a multiple of 16" in report.ordinary["head.weight"]
    assert "Embedding is not a supported layer type" in report.ordinary["embed.weight"]
    assert "6x2 tiles of 16x16" in str(report)

    tokens = torch.randint(0, 12, (16, 6))
    target = tokens.flip(1)  # reverse the sequence: needs attention
    first, last = _train(hyper, tokens, target, steps=30, lr=3e-3)
    assert last < 0.7 * first, (first, last)

    hyper.eval()
    fresh = TinyTransformer().eval()
    fresh.load_state_dict(materialise(hyper).state_dict(), strict=True)
    with torch.no_grad():  # torch's inference fast path for the plain model
        torch.testing.assert_close(fresh(tokens), hyper(tokens), rtol=1e-5, atol=1e-5)


def test_conv1d_rectangular_tiles_and_one_generator_per_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2),
                          nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2), nn.Flatten(), nn.Linear(32 * 4, 16))
    hyper = hyperize(model, tile_size=(16, 8), embedding_size=3, share="shape")
    gens = hyper.hyperize_report.generators
    assert sorted(gens) == ["16x128", "32x32x5", "32x8x5"]  # one per distinct weight shape
    assert all(g.out_size == 16 and g.in_size == 8 for g in gens.values())
    # each (o, i) block of a weight is the generator applied to that tile's own embedding
    t = hyper[2].parametrizations.weight[0]
    assert t.z.shape == (2, 4, 3)
    w = hyper[2].weight
    for o in range(2):
        for i in range(4):
            torch.testing.assert_close(w[16 * o:16 * o + 16, 8 * i:8 * i + 8], t.generator(t.z[o, i]))
    x = torch.randn(2, 8, 4)
    assert hyper(x).shape == (2, 16)  # an nn.Sequential runs every child: nothing was added to it
    shared = hyperize(model, tile_size=(16, 8), embedding_size=3)  # share="all": one per kernel shape
    assert sorted(shared.hyperize_report.generators) == ["16x8", "16x8x5"]
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(materialise(hyper).state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), hyper(x))


def test_all_tiles_are_generated_in_one_batched_call_per_generator_per_forward():
    torch.manual_seed(0)
    hyper = hyperize(SmallCNN(), embedding_size=4)
    (gen,) = hyper.hyperize_report.generators.values()
    calls = []
    gen.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = hyper(torch.randn(2, 3, 8, 8))
    assert calls == [2 + 4]  # 2x1 + 2x2 tiles, one call
    out.sum().backward()  # and the gradient reaches every embedding and the generator
    assert all(t.z.grad is not None and t.z.grad.abs().sum() > 0 for t in _tiled(hyper))
    assert all(p.grad is not None for p in gen.parameters())
    assert all(t._weight is None for t in _tiled(hyper))  # released after the forward
    calls.clear()
    hyper.features[0](torch.randn(1, 16, 4, 4))  # a layer called on its own generates its own tiles
    assert calls == [2]


def test_layer_selection_by_pattern_type_and_predicate():
    model = SmallCNN()
    assert hyperize(model, "features.3").hyperize_report.generated == ["features.3.weight"]
    assert hyperize(model, ["features.0", "features.3"]).hyperize_report.generated == \
        ["features.0.weight", "features.3.weight"]
    by_type = hyperize(model, nn.Conv2d, strict=False)
    assert by_type.hyperize_report.generated == ["features.0.weight", "features.3.weight"]
    assert by_type.hyperize_report.ordinary["stem.weight"] == "in_channels/groups 3 is not a multiple of 16"
    pred = hyperize(model, lambda name, m: isinstance(m, nn.Conv2d) and m.out_channels == m.in_channels)
    assert pred.hyperize_report.generated == ["features.3.weight"]
    assert pred.hyperize_report.ordinary["features.0.weight"] == "not selected"
    lin = hyperize(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16)), tile_size=16)
    assert lin.hyperize_report.generated == ["0.weight", "1.weight"]


def test_clear_refusals():
    model = SmallCNN()
    with pytest.raises(ValueError, match=r"layer 'stem' \(Conv2d, weight \(16, 3, 3, 3\)\) cannot be made of 16x16 "
                                         r"tiles: in_channels/groups 3 is not a multiple of 16"):
        hyperize(model, nn.Conv2d)  # an explicit selection is strict by default
    with pytest.raises(ValueError, match=r"no module of SmallCNN is named like \['featurs.0'\]"):
        hyperize(model, ["features.3", "featurs.0"])
    with pytest.raises(ValueError, match="Embedding cannot be generated"):
        hyperize(model, nn.Embedding)
    with pytest.raises(ValueError, match="no layer of SmallCNN can be generated with 64x64 tiles"):
        hyperize(model, tile_size=64)
    with pytest.raises(ValueError, match="already hyperized"):
        hyperize(hyperize(model))
    for kwargs, match in (({"tile_size": 0}, "tile_size"), ({"tile_size": (16, 16, 3)}, "tile_size"),
                          ({"embedding_size": 0}, "embedding_size"), ({"share": "layer"}, "share"),
                          ({"init": "xavier"}, "init"), ({"hidden_size": -1}, "hidden_size")):
        with pytest.raises(ValueError, match=match):
            hyperize(model, **kwargs)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hyperize(lambda x: x)
    with pytest.raises(TypeError, match="layers"):
        hyperize(model, 3)
    # a weight that already has a parametrization (weight norm) is left alone, and said so
    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)), nn.Linear(16, 16))
    r = hyperize(wn).hyperize_report
    assert r.generated == ["1.weight"] and r.ordinary["0.weight"] == "its weight already has a parametrization"
    lazy = nn.Sequential(nn.LazyLinear(16), nn.Linear(16, 16))
    r = hyperize(lazy).hyperize_report
    assert r.generated == ["1.weight"] and "lazy layer" in r.ordinary["0.weight"]


def test_state_dict_round_trip_between_hyperized_copies():
    torch.manual_seed(0)
    a = hyperize(SmallCNN(), embedding_size=8).eval()
    torch.manual_seed(1)
    b = hyperize(SmallCNN(), embedding_size=8).eval()
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(a(x), b(x))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(b(x), a(x))
    keys = list(a.state_dict())
    assert "features.0.parametrizations.weight.0.z" in keys
    assert sum(".own_generator." in k for k in keys) == 4  # the shared generator is saved once


def test_deep_copies_are_independent_and_materialise_leaves_the_original_working():
    torch.manual_seed(0)
    hyper = hyperize(SmallCNN()).eval()
    clone = copy.deepcopy(hyper)
    assert {id(t.generator) for t in _tiled(clone)} != {id(t.generator) for t in _tiled(hyper)}
    assert len({id(t.generator) for t in _tiled(clone)}) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = hyper(x)
        materialise(clone)
        materialise(hyper)
        torch.testing.assert_close(hyper(x), before)
        torch.testing.assert_close(clone(x), before)


def test_gradcheck_through_a_hyperized_model_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 2)).double()
    hyper = hyperize(model, tile_size=2, embedding_size=2, hidden_size=3)
    assert len(_tiled(hyper)) == 2
    for p in hyper.parameters():  # non-zero generator biases too
        nn.init.normal_(p, std=0.5)
    names = [n for n, _ in hyper.named_parameters()]
    x = torch.randn(3, 4, 4, dtype=torch.double)

    def fn(*params):
        return torch.func.functional_call(hyper, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_() for p in hyper.parameters())
    assert torch.autograd.gradcheck(fn, params)


def test_each_generated_layer_of_hyper_wrn_40_2_starts_near_its_kaiming_std():
    torch.manual_seed(0)
    for init, ok in (("match", True), ("generator", False)):
        model = create_model("hyper-wrn-40-2", init=init)
        ratios = []
        for name, m in model.named_modules():
            if parametrize.is_parametrized(m, "weight"):
                kaiming = math.sqrt(2.0 / (m.out_channels * 9))  # the plain WRN's fan-out Kaiming init
                ratios.append(m.weight.std().item() / kaiming)
        assert len(ratios) == 36
        if ok:
            assert all(0.75 < r < 1.25 for r in ratios), ratios
        else:  # the earlier start: a single tile's Kaiming std everywhere, ~2.8x too large at 128 channels
            assert max(ratios) > 2.5


def test_init_options_and_counts_on_the_meta_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
    k = hyperize(model, init="kaiming")
    assert abs(k[0].weight.std().item() / math.sqrt(2 / 64) - 1) < 0.01
    f = hyperize(model, init=0.05)
    assert abs(f[2].weight.std().item() / 0.05 - 1) < 0.01
    m = hyperize(model)
    assert abs(m[2].weight.std().item() / model[2].weight.std().item() - 1) < 0.01
    with torch.device("meta"):
        meta = hyperize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32)), embedding_size=4,
                        init="kaiming")
    r = parameter_report(meta)
    g = 4 * 16 * 4 + 16 * 4 + 4 * 16 + 16  # N_z N_in d + N_in d + d N_out + N_out (a linear tile)
    assert r["generator"] == g and r["embeddings"] == 4 * (4 * 2 + 2 * 2) and r["generated"] == 64 * 32 + 32 * 32
    assert r["hypernetwork"] == g + 48 and r["ordinary"] == 64


def test_hyperconv2d_refuses_an_embedding_size_that_is_not_its_generators():
    g = KernelGenerator(8, 16, 16, 3)
    with pytest.raises(ValueError, match="embedding_size=4 differs from the generator's embedding_size=8"):
        HyperConv2d(16, 16, 3, g, embedding_size=4)
    assert HyperConv2d(16, 16, 3, g, embedding_size=8).z.shape == (1, 1, 8)  # the same size is fine
    assert HyperConv2d(16, 16, 3, embedding_size=5).z.shape[-1] == 5  # standalone: it sets its generator's


def test_a_single_layer_can_be_the_model():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    hyper = hyperize(layer, embedding_size=4)
    assert hyper.hyperize_report.generated == ["weight"]
    plain = materialise(hyper)
    assert type(plain) is nn.Linear and not plain._forward_pre_hooks
    x = torch.randn(3, 32)
    torch.testing.assert_close(plain(x), hyper(x))


def test_attention_with_separate_key_value_sizes_keeps_its_projections():
    mha = nn.MultiheadAttention(32, 2, kdim=16, vdim=16)
    r = hyperize(mha, strict=False, tile_size=16).hyperize_report
    assert r.generated == ["out_proj.weight"]
    assert "kdim/vdim" in r.ordinary["q_proj_weight"]
    with pytest.raises(ValueError, match=r"MultiheadAttention, in_proj_weight \(72, 24\)\) cannot be made of 16x16 "
                                         r"tiles: 3 x embed_dim 72 is not a multiple of 16"):
        hyperize(nn.MultiheadAttention(24, 2), nn.MultiheadAttention, tile_size=16)


# ---------------------------------------------------------------- transposed convolutions (DCGAN)
class DCGANGenerator(nn.Module):
    """PyTorch's DCGAN example generator at a small size (nz 16, ngf 16, 32x32 images)."""

    def __init__(self, nz: int = 16, ngf: int = 16, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x):
        return self.main(x)


def dcgan_weights_init(m: nn.Module) -> None:
    """The DCGAN example's custom initialisation, applied with model.apply."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def _convt_std(model: nn.Module) -> dict[str, float]:
    return {n: float(m.weight.detach().std()) for n, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvTransposeNd)}


def test_dcgan_generator_conv_transpose_report_train_and_materialise():
    torch.manual_seed(0)
    plain = DCGANGenerator()
    model = hyperize(plain)
    report = model.hyperize_report
    assert report.generated == ["main.0.weight", "main.3.weight", "main.6.weight"]
    assert "out_channels/groups 3 is not a multiple of 16" in report.ordinary["main.9.weight"]
    assert "ConvTranspose2d" in str(report) and "4x2 tiles of 16x16x4x4" in str(report)
    assert type(model.main[3]) is not nn.ConvTranspose2d and isinstance(model.main[3], nn.ConvTranspose2d)
    for name, std in _convt_std(model).items():  # init="match": each layer starts at its own scale
        assert std == pytest.approx(_convt_std(plain)[name], rel=1e-4)
    x = torch.randn(4, 16, 1, 1)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(t.z.grad is not None for t in _tiled(model))
    model.eval()
    flat = materialise(model)
    assert type(flat.main[3]) is nn.ConvTranspose2d and not parametrize.is_parametrized(flat.main[3])
    torch.testing.assert_close(flat(x), model(x))
    DCGANGenerator().load_state_dict(flat.state_dict(), strict=True)


@pytest.mark.parametrize("dim", [1, 3])
def test_conv_transpose_1d_and_3d_with_groups(dim):
    torch.manual_seed(1)
    convt = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dim]
    net = nn.Sequential(convt(32, 16, 3, stride=2, groups=2), nn.ReLU(), convt(16, 8, 3))
    model = hyperize(net, tile_size=8)
    assert model.hyperize_report.generated == ["0.weight", "2.weight"]
    x = torch.randn(2, 32, *([4] * dim))
    y = model(x)
    y.sum().backward()
    flat = materialise(model)
    assert type(flat[0]) is convt and flat[0].weight.shape == (32, 8, *([3] * dim))
    torch.testing.assert_close(flat(x), y.detach())


# ---------------------------------------------------------------- initialisation after hyperize
def test_dcgan_weights_init_after_hyperize_acts_on_the_generated_weights():
    torch.manual_seed(2)
    model = hyperize(DCGANGenerator())
    z_before = [t.z.detach().clone() for t in _tiled(model)]
    model.apply(dcgan_weights_init)
    for name, std in _convt_std(model).items():  # generated and ordinary layers alike
        assert std == pytest.approx(0.02, rel=1e-5 if name != "main.9" else 0.2), name
    assert all(not torch.equal(t.z, z) for t, z in zip(_tiled(model), z_before))  # re-drawn, not only rescaled
    assert float(model.main[1].weight.detach().mean()) == pytest.approx(1.0, abs=0.02)  # BatchNorm as usual

    def build(seed):  # reproducible under the global seed, like the ordinary init
        torch.manual_seed(seed)
        return hyperize(DCGANGenerator()).apply(dcgan_weights_init)
    for a, b in zip(_tiled(build(3)), _tiled(build(3))):
        assert torch.equal(a.z, b.z)
    # the forward uses the new weights, and materialise writes them in
    x = torch.randn(2, 16, 1, 1)
    torch.testing.assert_close(materialise(model).main[3].weight.detach(), model.main[3].weight.detach())
    torch.testing.assert_close(materialise(model).eval()(x), model.eval()(x))


@pytest.mark.parametrize("init, expected", [
    (lambda w: nn.init.normal_(w, 0.0, 0.05), 0.05),
    (lambda w: nn.init.uniform_(w, -0.1, 0.1), 0.1 / math.sqrt(3)),
    (lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), math.sqrt(2 / (64 * 16))),
    (lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)), math.sqrt(1 / 3) / math.sqrt(32 * 16)),
    (lambda w: nn.init.xavier_uniform_(w), math.sqrt(2 / (64 * 16 + 32 * 16))),
    (lambda w: nn.init.trunc_normal_(w, std=0.02), 0.02),
    (lambda w: w.data.normal_(0, 0.03), 0.03),
    (lambda w: w.detach().uniform_(-0.2, 0.2), 0.2 / math.sqrt(3)),
])
def test_plain_nn_init_calls_on_a_generated_weight(init, expected):
    """ConvTranspose2d(64, 32, 4): weight (64, 32, 4, 4); torch's fan_in is dim 1 (32 * 16)."""
    torch.manual_seed(4)
    layer = hyperize(DCGANGenerator()).main[3]
    init(layer.weight)
    assert float(layer.weight.detach().std()) == pytest.approx(expected, rel=1e-4)


def test_writes_a_generated_weight_cannot_take_raise_naming_the_layer():
    torch.manual_seed(5)
    model = hyperize(DCGANGenerator())
    layer = model.main[3]
    tiled = layer.parametrizations.weight[0]
    z = tiled.z.detach().clone()
    attempts = {
        "constant_": lambda w: nn.init.constant_(w, 0.1),
        "zeros_": lambda w: nn.init.zeros_(w),
        "orthogonal_": lambda w: nn.init.orthogonal_(w),
        "mean": lambda w: nn.init.normal_(w, 1.0, 0.02),
        "asymmetric uniform": lambda w: nn.init.uniform_(w, 0.0, 1.0),
        ".data.fill_": lambda w: w.data.fill_(0.5),
        "slice": lambda w: w.data[0].normal_(0, 0.02),
        "mul_": lambda w: w.mul_(2),
        "setitem": lambda w: w.data.__setitem__(0, 0.0),
        "+=": lambda w: w.data.__iadd__(1.0),
        "out=": lambda w: torch.mul(torch.ones(w.shape), 2, out=w.data),
        ".data =": lambda w: setattr(w, "data", torch.zeros(w.shape)),
        # trunc_normal_ whose first draw leaves values outside the bounds: the draw is undone
        "trunc_normal_ out of bounds": lambda w: nn.init.trunc_normal_(w, std=1.0, a=-0.5, b=0.5),
    }
    for what, attempt in attempts.items():
        with pytest.raises(RuntimeError, match=r"layer 'main\.3' \(ConvTranspose2d, weight\).*generated"):
            attempt(layer.weight)
        assert torch.equal(tiled.z, z), what  # nothing half-done
    with pytest.raises(RuntimeError, match=r"layer 'main\.3'.*an assigned tensor"):
        layer.weight = torch.zeros(64, 32, 4, 4)
    assert torch.equal(tiled.z, z)
    model(torch.randn(2, 16, 1, 1))  # still a working model


def test_the_forward_reads_plain_weights():
    """Only reads from outside the model's forward are intercepted: the forward itself (and
    batched_kernels) sees the batched kernel as a plain tensor."""
    from hypernetworks.nn.static import _GeneratedWeight
    model = hyperize(DCGANGenerator())
    seen = []
    model.main[3].register_forward_pre_hook(lambda m, args: seen.append(type(m.weight)))
    model(torch.randn(2, 16, 1, 1))
    assert seen == [torch.Tensor]
    assert type(model.main[3].weight) is _GeneratedWeight
    y = model.main[3](torch.randn(2, 64, 4, 4))  # a layer called on its own still works
    assert type(y) is torch.Tensor and y.shape == (2, 32, 8, 8)


def test_a_generated_weight_prints_saves_and_copies_as_a_plain_tensor():
    layer = hyperize(DCGANGenerator()).main[3]
    w = layer.weight.detach()
    assert repr(w).startswith("tensor(")
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, w.as_subclass(torch.Tensor))
    assert type(copy.deepcopy(w)) is torch.Tensor
    with torch.device("meta"):  # shapes only: an init has nothing to act on, as on any meta tensor
        meta = hyperize(DCGANGenerator())
    nn.init.normal_(meta.main[3].weight, 0.0, 0.02)
