"""Channel-adaptive hypernetworks: the generated patch projection against a per-channel reference,
any subset and order of channels, unseen channels (mean init, metadata), sampling, the three ViT
stems, gradients, errors, and the channel-sampling task end to end."""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from hypernetworks import create_model, list_models
from hypernetworks.models.vit import ChannelAdaptiveViT
from hypernetworks.nn.channels import (UNSEEN_RULES, ChannelHyperPatchEmbed, PublishedHyperPatchEmbed, channel_subsets,
                                       resolve_channels, sample_channels)
from hypernetworks.nn.static import parameter_report
from hypernetworks.tasks.channels import ChannelClassifier

REPO = Path(__file__).resolve().parents[1]
NAMES = ["red", "green", "blue"]
META = {"red": [605.0, 90.0], "green": [535.0, 90.0], "blue": [465.0, 80.0]}


def _reference(embed: ChannelHyperPatchEmbed, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The layer written out channel by channel: W_c = G(z_c) from the generator's own equations
    (a_c = W_1 z_c + B_1, W_c = W_out a_c + B_out), one conv per channel, averaged."""
    g, p = embed.generator, embed.patch_size
    out = 0
    for j, name in enumerate(names):
        z = embed.embeddings(torch.tensor([embed.channel_names.index(name)]))[0]
        a = g.w_in[0] @ z + g.b_in[0]
        w = (g.w_out @ a + g.b_out).view(embed.embed_dim, 1, p, p)
        out = out + F.conv2d(x[:, j:j + 1], w, stride=p)
    return out / len(names) + embed.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("metadata", [None, META], ids=["learned", "metadata"])
def test_projection_matches_per_channel_reference_for_every_subset_and_order(metadata):
    torch.manual_seed(0)
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=6, patch_size=2, embedding_size=5, hidden_size=4, metadata=metadata)
    torch.nn.init.normal_(embed.bias)
    x = torch.randn(2, 3, 4, 4)
    for subset in channel_subsets(NAMES):
        for order in itertools.permutations(subset):
            cols = [NAMES.index(c) for c in order]
            y = embed(x[:, cols], list(order))
            assert y.shape == (2, 6, 2, 2)
            torch.testing.assert_close(y, _reference(embed, x[:, cols], list(order)))
    # indices work as names do, and None means all channels in order
    torch.testing.assert_close(embed(x, [0, 1, 2]), embed(x, NAMES))
    torch.testing.assert_close(embed(x), embed(x, NAMES))


def test_kernels_come_from_one_generator_call():
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, embedding_size=3)
    calls = []
    embed.generator.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    embed(torch.randn(1, 2, 4, 4), ["blue", "red"])
    assert calls == [torch.Size([2, 3])]


@pytest.mark.parametrize("metadata", [None, META], ids=["learned", "metadata"])
def test_gradcheck_float64(metadata):
    torch.manual_seed(0)
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=3, patch_size=2, embedding_size=3, hidden_size=2,
                                   metadata=metadata, metadata_hidden=4, metadata_frequencies=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in embed.parameters()]
    names = [n for n, _ in embed.named_parameters()]

    def f(x, *ps):
        for n, p in zip(names, ps):  # route the parameters through the check
            mod, _, attr = n.rpartition(".")
            target = embed.get_submodule(mod) if mod else embed
            target._parameters[attr] = p
        return embed(x, ["green", "red"])

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def _train_tiny(stem: str, steps: int = 30, **kw) -> ChannelAdaptiveViT:
    """A few steps of channel-sampled training on a learnable toy task (the class is which
    channel's mean is largest), so the checks below run on a trained model, not an initial one."""
    torch.manual_seed(0)
    model = ChannelAdaptiveViT(NAMES, stem=stem, num_classes=3, img_size=8, patch_size=4, embed_dim=16, depth=1,
                               num_heads=2, embedding_size=8, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8)
        y = torch.randint(0, 3, (16,))
        x[torch.arange(16), y] += 1.0
        keep = sample_channels(3)
        loss = F.cross_entropy(model(x[:, keep], [NAMES[i] for i in keep]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("stem,kw", [("hyper", {}), ("hyper", {"metadata": META}), ("fixed", {}), ("channelvit", {})],
                         ids=["hyper-learned", "hyper-metadata", "fixed", "channelvit"])
def test_trained_model_answers_every_subset_and_permutation_invariantly(stem, kw):
    model = _train_tiny(stem, **kw)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for subset in channel_subsets(NAMES):
            cols = [NAMES.index(c) for c in subset]
            ref = model(x[:, cols], subset)
            assert ref.shape == (4, 3) and torch.isfinite(ref).all()
            for order in itertools.permutations(range(len(subset))):
                names = [subset[i] for i in order]
                # the same channels, shuffled together with their names: the same answer
                torch.testing.assert_close(model(x[:, [cols[i] for i in order]], names), ref, atol=1e-5, rtol=1e-5)
        # the names matter: the same pixels under swapped names give another answer
        assert not torch.allclose(model(x, ["blue", "green", "red"]), model(x, NAMES), atol=1e-4)


def test_learned_unseen_channel_gets_mean_of_known_embeddings():
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, embedding_size=3)
    z = embed.channel_embedding.detach().clone()
    embed.init_unseen_channels(["green"], known=["red", "blue"])
    torch.testing.assert_close(embed.channel_embedding[1], (z[0] + z[2]) / 2)
    torch.testing.assert_close(embed.channel_embedding[[0, 2]], z[[0, 2]])  # known ones untouched
    # a brand-new channel starts at the mean of all existing embeddings and is usable at once
    i = embed.add_channel("nir")
    assert i == 3 and embed.channel_names[-1] == "nir"
    torch.testing.assert_close(embed.channel_embedding[3], embed.channel_embedding[:3].mean(0))
    assert embed(torch.randn(1, 2, 4, 4), ["nir", "red"]).shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="already known"):
        embed.add_channel("red")
    with pytest.raises(ValueError, match="metadata"):
        embed.add_channel("swir", metadata=[1600.0, 90.0])


def test_metadata_conditioning_gives_an_unseen_channel_weights_from_its_description():
    torch.manual_seed(0)
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, embedding_size=3, metadata=META)
    embed.add_channel("nir", metadata=[850.0, 100.0])
    k = embed.kernels(torch.tensor([3]))
    expect = embed.generator(embed.metadata_encoder(torch.tensor([[850.0, 100.0]])))
    torch.testing.assert_close(k, expect.squeeze(2).transpose(0, 1))
    # a different description gives different weights; the same one the same weights
    embed.add_channel("nir2", metadata=[850.0, 100.0])
    embed.add_channel("swir", metadata=[1610.0, 90.0])
    torch.testing.assert_close(embed.kernels(torch.tensor([4])), k)
    assert not torch.allclose(embed.kernels(torch.tensor([5])), k)
    embed.init_unseen_channels(["green"])  # nothing to do: metadata decides
    with pytest.raises(ValueError, match="needs the channel's metadata"):
        embed.add_channel("x")
    with pytest.raises(ValueError, match="numbers"):
        embed.add_channel("y", metadata=[1.0])


def test_fixed_stem_is_zero_fill_and_rescale():
    torch.manual_seed(0)
    model = ChannelAdaptiveViT(NAMES, stem="fixed", img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    x = torch.randn(2, 3, 8, 8)
    full = torch.zeros_like(x)
    full[:, 2] = x[:, 2] * 3.0
    torch.testing.assert_close(model.stem(x[:, [2]], ["blue"]), model.stem.proj(full))
    # untrained slices take the mean of the trained ones
    model.init_unseen_channels(["green"], known=["red", "blue"])
    w = model.stem.proj.weight
    torch.testing.assert_close(w[:, 1], (w[:, 0] + w[:, 2]) / 2)


def test_channelvit_has_one_token_per_channel_and_patch():
    model = ChannelAdaptiveViT(NAMES, stem="channelvit", img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    x = torch.randn(2, 3, 8, 8)
    assert model.tokens(x, NAMES).shape == (2, 3 * 4, 8)
    assert model.tokens(x[:, :1], ["red"]).shape == (2, 4, 8)
    model.init_unseen_channels(["blue"])
    e = model.stem.channel_embedding
    torch.testing.assert_close(e[2], e[:2].mean(0))


def test_hierarchical_sampling_covers_subset_sizes_uniformly():
    g = torch.Generator().manual_seed(0)
    draws = [sample_channels(4, g) for _ in range(4000)]
    assert all(d == sorted(set(d)) and 1 <= len(d) <= 4 and all(0 <= i < 4 for i in d) for d in draws)
    sizes = Counter(len(d) for d in draws)
    assert all(abs(sizes[k] / 4000 - 0.25) < 0.03 for k in range(1, 5)), sizes
    singles = Counter(d[0] for d in draws if len(d) == 1)
    assert all(abs(singles[i] / sizes[1] - 0.25) < 0.06 for i in range(4)), singles
    assert channel_subsets(["a", "b"]) == [["a"], ["b"], ["a", "b"]]
    assert len(channel_subsets(NAMES)) == 7


def test_bad_channel_arguments_raise_clear_errors():
    embed = ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, embedding_size=3)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="unknown channel 'nir'"):
        embed(x, ["red", "nir"])
    with pytest.raises(ValueError, match="duplicate"):
        embed(x, ["red", "red"])
    with pytest.raises(ValueError, match="names 3 channels but the input has 2"):
        embed(x, NAMES)
    with pytest.raises(ValueError, match="channels=None"):
        embed(x)
    with pytest.raises(ValueError, match="out of range"):
        embed(x, [0, 7])
    with pytest.raises(TypeError, match="string"):
        resolve_channels(NAMES, "red", 1)
    with pytest.raises(ValueError, match="empty"):
        resolve_channels(NAMES, [], 0)
    with pytest.raises(ValueError, match="channels must be"):
        ChannelHyperPatchEmbed([], embed_dim=4, patch_size=2)
    with pytest.raises(ValueError, match="duplicate"):
        ChannelHyperPatchEmbed(["a", "a"], embed_dim=4, patch_size=2)
    with pytest.raises(ValueError, match="no entry for channels"):
        ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, metadata={"red": [1.0]})
    with pytest.raises(ValueError, match="reduction"):
        ChannelHyperPatchEmbed(NAMES, embed_dim=4, patch_size=2, reduction="max")
    with pytest.raises(ValueError, match="stem"):
        ChannelAdaptiveViT(NAMES, stem="conv")
    with pytest.raises(ValueError, match="metadata conditioning needs stem='hyper'"):
        ChannelAdaptiveViT(NAMES, stem="fixed", metadata=META)
    with pytest.raises(ValueError, match=r"x must be \(B, C, 8, 8\)"):
        ChannelAdaptiveViT(NAMES, img_size=8, patch_size=4, embed_dim=8, num_heads=2)(torch.randn(1, 3, 16, 16))


def test_registered_models_and_matched_tiny_budgets():
    names = list_models("*vit*")
    for prefix in ("published-hypernet-vit", "hypernet-vit", "fixed-vit", "channelvit"):
        for size in ("s16", "s8", "tiny-p4"):
            assert f"{prefix}-{size}" in names
    totals = {n: parameter_report(create_model(n))["total"]
              for n in ("hypernet-vit-tiny-p4", "fixed-vit-tiny-p4", "channelvit-tiny-p4")}
    assert max(totals.values()) / min(totals.values()) < 1.10, totals  # the comparison's "same budget"
    eight = [f"c{i}" for i in range(8)]
    with torch.device("meta"):
        big = {n: parameter_report(create_model(n, channels=eight, num_classes=161))["total"]
               for n in ("hypernet-vit-s16", "fixed-vit-s16", "channelvit-s16")}
    assert max(big.values()) / min(big.values()) < 1.05, big
    m = create_model("hypernet-vit-tiny-p4", channels=["a", "b"], num_classes=5)
    assert m(torch.randn(2, 1, 32, 32), ["b"]).shape == (2, 5)
    with torch.device("meta"):
        s16 = create_model("hypernet-vit-s16", channels=[f"c{i}" for i in range(8)], num_classes=161)
    assert s16.stem.generator.out_size == 384 and s16.stem.patch_size == 16
    with torch.device("meta"):  # the published HyperNet at ViT-S/16: z and d 256, D/8 = 48 generated channels
        pub = create_model("published-hypernet-vit-s16", channels=[f"c{i}" for i in range(8)], num_classes=161)
    assert isinstance(pub.stem, PublishedHyperPatchEmbed) and pub.stem.generated_dim == 48
    assert pub.stem.channel_embedding.shape == (8, 256) and pub.stem.w_out.shape == (256, 48, 16, 16)


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += 1.0
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_task_trains_with_sampling_and_tests_every_subset_leave_one_out(tmp_path):
    torch.manual_seed(0)
    task = ChannelClassifier(
        "hypernet-vit-tiny-p4", model_args=dict(img_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3),
        num_classes=3, lr=3e-3, train_channels=["red", "blue"], eval_subsets="all")
    assert task.unseen_channels() == ["green"]
    seen = []
    orig = task.model.forward
    task.model.forward = lambda x, channels=None: (seen.append(tuple(channels)), orig(x, channels))[1]
    trainer = Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, train_dataloaders=_loader(192, 0))
    assert seen and all(set(s) <= {"red", "blue"} for s in seen)  # green never used in training
    assert len(set(seen)) > 1  # subsets vary from batch to batch
    emb = task.model.stem.channel_embedding
    trained_mean = emb[[0, 2]].detach().mean(0)
    task.model.forward = orig
    metrics = trainer.test(task, dataloaders=_loader(64, 1), verbose=False)[0]
    torch.testing.assert_close(emb[1].detach(), trained_mean)  # green: the mean of the trained embeddings
    for subset in channel_subsets(NAMES):
        assert 0.0 <= metrics[f"test_acc/{'+'.join(subset)}"] <= 1.0
    assert metrics["test_acc"] == pytest.approx(metrics["test_acc/red+green+blue"])
    assert task.hparams.train_channels == ["red", "blue"]  # saved for load_task


def test_task_argument_errors():
    with pytest.raises(ValueError, match="channel_sampling"):
        ChannelClassifier(channel_sampling="dropout")
    with pytest.raises(ValueError, match="train_channels has channels"):
        ChannelClassifier(train_channels=["nir"])
    with pytest.raises(ValueError, match="eval_subsets"):
        ChannelClassifier(eval_subsets="some")
    with pytest.raises(ValueError, match="list the subsets"):
        ChannelClassifier(model_args=dict(channels=[f"b{i}" for i in range(11)]), eval_subsets="all")


BENCHMARK_RECIPES = sorted(p for pat in ("so2sat-*.yaml", "jumpcp-*.yaml", "chammi-*.yaml", "cifar10-channels-*.yaml")
                           for p in (REPO / "configs").glob(pat))


@pytest.mark.parametrize("recipe", BENCHMARK_RECIPES, ids=lambda p: p.stem)
def test_channel_recipes_build(recipe):
    """Every channel recipe names a registered model that builds with its arguments (on the meta
    device: shapes only), valid task arguments, and a data module that takes its arguments."""
    import importlib
    import inspect

    import yaml

    cfg = yaml.safe_load(recipe.read_text())
    init = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "hypernetworks.tasks.channels.ChannelClassifier"
    assert set(init) <= set(inspect.signature(ChannelClassifier.__init__).parameters)
    with torch.device("meta"):
        model = create_model(init["model"], **(init.get("model_args") or {}))
    assert model.head.out_features == init.get("num_classes", 10)
    subsets = init.get("eval_subsets", "all")
    if subsets not in ("all", "full"):
        assert all(c in model.channel_names for s in subsets for c in s)
    assert all(c in model.channel_names for c in init.get("train_channels") or [])
    module, _, cls = cfg["data"]["class_path"].rpartition(".")
    data_cls = getattr(importlib.import_module(module), cls)
    assert set(cfg["data"].get("init_args") or {}) <= set(inspect.signature(data_cls.__init__).parameters)


# ------------------------------------------------------------------- the published HyperNet


def _reference_published(x, cur_channels, emb, W, b, W_out, b_out, conv1x1_w, conv1x1_b, patch_size):
    """The reference forward of the published HyperNet stem, written out literally from its
    equations (DiChaViT's HyperNetViT.prepare_tokens with its HyperNetwork, use_conv1x1 off):
    an embedding lookup, a = z W + b, K = a W_out + b_out, K laid out (out, channels * in, p, p),
    one convolution without bias over the channels present, then the 1x1 convolution."""
    z = emb[torch.tensor(cur_channels)]                                  # (c, z_dim)
    a = torch.einsum("cz,zid->cid", z, W) + b                           # (c, 1, d)
    K = torch.einsum("cid,dohw->ciohw", a, W_out) + b_out               # (c, 1, o, p, p)
    c, i, o, h, w = K.shape
    K = K.permute(2, 0, 1, 3, 4).reshape(o, c * i, h, w)                # "c i o h w -> o (c i) h w"
    y = F.conv2d(x, K, bias=None, stride=patch_size, padding=0)
    return F.conv2d(y, conv1x1_w, conv1x1_b)


def test_published_hypernet_equals_the_reference_forward_on_random_weights():
    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    stem = PublishedHyperPatchEmbed(names, embed_dim=16, patch_size=2, embedding_size=6, hidden_size=5).double()
    with torch.no_grad():
        for prm in stem.parameters():
            prm.copy_(torch.randn_like(prm))
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    for subset in channel_subsets(names):
        for order in itertools.permutations(subset):
            idx = [names.index(c) for c in order]
            ref = _reference_published(x[:, idx], idx, stem.channel_embedding, stem.w_in, stem.b_in, stem.w_out,
                                       stem.b_out, stem.lift.weight, stem.lift.bias, 2)
            torch.testing.assert_close(stem(x[:, idx], list(order)), ref)
    # a sum over the channels present, not a mean: the projection before the (affine) lift adds up
    bias = stem.lift.bias.view(1, -1, 1, 1)
    both = stem(x[:, [0, 2]], ["a", "c"]) - bias
    torch.testing.assert_close(both, (stem(x[:, [0]], ["a"]) - bias) + (stem(x[:, [2]], ["c"]) - bias))
    # inside a ViT: the published stem is what the registered published-hypernet models use
    m = create_model("published-hypernet-vit-tiny-p4", channels=names, num_classes=3)
    assert isinstance(m.stem, PublishedHyperPatchEmbed) and m(torch.randn(2, 2, 32, 32), ["d", "a"]).shape == (2, 3)
    with pytest.raises(ValueError, match="sums over the channels"):
        ChannelAdaptiveViT(names, stem="published-hyper", reduction="mean")
    with pytest.raises(ValueError, match="metadata conditioning needs stem='hyper'"):
        ChannelAdaptiveViT(NAMES, stem="published-hyper", metadata=META)


def test_published_hypernet_initialisation():
    """DiChaViT's stem sizes and init: z ~ N(0, 1), W1 and W2 Kaiming-normal (torch's fan-in of
    their shapes), both generator biases N(0, 1) (not zeroed), D/8 generated channels."""
    torch.manual_seed(1)
    stem = PublishedHyperPatchEmbed([f"c{i}" for i in range(64)], embed_dim=384, patch_size=16)
    assert stem.embedding_size == stem.hidden_size == 256 and stem.generated_dim == 48
    assert stem.w_in.shape == (256, 1, 256) and stem.b_in.shape == (1, 256)
    assert stem.w_out.shape == (256, 48, 16, 16) and stem.b_out.shape == (48, 16, 16)
    assert stem.lift.weight.shape == (384, 48, 1, 1) and stem.lift.bias is not None
    for t, std in ((stem.channel_embedding, 1.0), (stem.b_out, 1.0), (stem.b_in, 1.0),
                   (stem.w_in, (2 / 256) ** 0.5), (stem.w_out, (2 / (48 * 16 * 16)) ** 0.5)):
        t = t.detach()
        assert abs(float(t.mean())) < 0.15 * std and float(t.std()) == pytest.approx(std, rel=0.1)


def _dichavit_unseen(emb, chunk, training_channels, rule):
    """DiChaViT's substitution for channels never trained, written out: walk the input's channels
    in order; an unseen one takes (by rule) the mean of the next 2 or 3 channels of the bank, the
    next one, or zeros, and the bank pointer advances by one; the bank is the trained channels
    (or, for *_not_in_chunk, the trained channels not in the input)."""
    bank = [c for c in training_channels if c not in chunk] if "not_in_chunk" in rule else list(training_channels)
    out, cur = [], 0
    for c in chunk:
        if c in training_channels:
            out.append(emb[c])
            continue
        if rule in ("avg_2", "avg_2_not_in_chunk"):
            out.append(emb[[bank[cur], bank[(cur + 1) % len(bank)]]].mean(0))
        elif rule in ("avg_3", "avg_3_not_in_chunk"):
            out.append(emb[[bank[cur], bank[(cur + 1) % len(bank)], bank[(cur + 2) % len(bank)]]].mean(0))
        elif rule == "replicate":
            out.append(emb[bank[cur]])
        elif rule == "zero":
            out.append(torch.zeros_like(emb[0]))
        cur = (cur + 1) % len(bank)
    return torch.stack(out)


@pytest.mark.parametrize("rule", [r for r in UNSEEN_RULES if r != "mean"])
@pytest.mark.parametrize("layer", ["published", "project"])
def test_unseen_channel_rules_as_in_dichavit(rule, layer):
    names = ["a", "b", "c", "d", "e"]
    torch.manual_seed(2)
    if layer == "published":
        stem = PublishedHyperPatchEmbed(names, embed_dim=8, patch_size=2, embedding_size=4, hidden_size=3)
    else:
        stem = ChannelHyperPatchEmbed(names, embed_dim=8, patch_size=2, embedding_size=4)
    table = stem.channel_embedding.detach().clone()
    stem.init_unseen_channels(["b", "d"], known=["e", "a", "c"], rule=rule)
    torch.testing.assert_close(stem.channel_embedding, table)  # nothing written: applied per forward
    trained = [0, 2, 4]
    for chunk in (["b", "a", "d"], ["d", "b", "e", "c"], ["d"], ["a", "c", "e", "b"]):
        idx = [names.index(c) for c in chunk]
        if rule.endswith("_not_in_chunk") and not [k for k in trained if k not in idx]:
            with pytest.raises(ValueError, match="no trained channel outside the input"):
                stem.embeddings(torch.tensor(idx))
            continue
        torch.testing.assert_close(stem.embeddings(torch.tensor(idx)), _dichavit_unseen(table, idx, trained, rule))
    # "mean" writes the mean of the known embeddings into the table and ends a per-forward rule
    stem.init_unseen_channels(["b", "d"], known=["e", "a", "c"], rule="mean")
    torch.testing.assert_close(stem.embeddings(torch.tensor([1]))[0], table[trained].mean(0))
    with pytest.raises(ValueError, match="rule must be one of"):
        stem.init_unseen_channels(["b"], rule="avg_4")


def test_task_passes_the_unseen_channel_rule_to_the_model():
    torch.manual_seed(0)
    task = ChannelClassifier("published-hypernet-vit-tiny-p4", num_classes=3, train_channels=["red", "blue"],
                             unseen_channel_rule="replicate", eval_subsets="full",
                             model_args=dict(channels=NAMES, img_size=8, embed_dim=16, depth=1, num_heads=2,
                                             num_classes=3, embedding_size=4, hidden_size=4))
    task.on_test_start()
    stem = task.model.stem
    assert stem._unseen_rule == "replicate" and stem._unseen_idx == (1,) and stem._bank_idx == (0, 2)
    torch.testing.assert_close(stem.embeddings(torch.tensor([1, 2]))[0], stem.channel_embedding[0])
    with pytest.raises(ValueError, match="unseen_channel_rule"):
        ChannelClassifier("published-hypernet-vit-tiny-p4", num_classes=3, unseen_channel_rule="average",
                          model_args=dict(channels=NAMES, num_classes=3))
    fixed = ChannelAdaptiveViT(NAMES, stem="fixed", img_size=8, embed_dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="mean of the known ones only"):
        fixed.init_unseen_channels(["green"], rule="zero")
