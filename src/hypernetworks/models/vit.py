"""Channel-adaptive Vision Transformers for multi-channel images (ChannelViT / CHAMMI benchmarks).

One ViT (``torch.nn.TransformerEncoder`` blocks, pre-norm, class token, learned positions) with
four interchangeable first layers ("stems"), all taking ``forward(x, channels)`` where
``channels`` names the channels present in x, in order:

* ``"published-hyper"``: ``PublishedHyperPatchEmbed`` -- the published HyperNet (DiChaViT's stem:
  embeddings and generator hidden size 256, D/8 generated channels summed over the channels
  present, a 1x1 convolution to D, N(0, 1) generator biases): the benchmark tables' "HyperNet";
* ``"hyper"``: ``ChannelHyperPatchEmbed`` -- the project's variant: each channel's slice of the
  patch projection is generated from its embedding (learned, or from its metadata) by the
  project's KernelGenerator (d = 8, mean over the channels present);
* ``"fixed"``: an ordinary patch projection over all known channels; missing channels are
  zero-filled and the present ones rescaled by C / |S| (the ViT baseline of ChannelViT);
* ``"channelvit"``: one token per channel and patch, made by a projection shared by all channels
  plus a learned channel embedding (Bao et al., 2023); the sequence is |S| times longer.

Registered as ``{published-hypernet-vit,hypernet-vit,fixed-vit,channelvit}-{s16,s8}`` (ViT-S: width 384, 12 blocks,
6 heads) and ``-tiny-p4`` (width 64, 4 blocks, 32x32 images: the CPU stand-in). Every factory
takes the same keyword overrides (``channels``, ``num_classes``, ``img_size``, ``metadata``, ...).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from hypernetworks.models.registry import register_model
from hypernetworks.nn.channels import ChannelHyperPatchEmbed, ChannelSpec, PublishedHyperPatchEmbed, resolve_channels

__all__ = ["ChannelAdaptiveViT", "FixedChannelPatchEmbed", "ChannelViTPatchEmbed", "STEMS"]

STEMS = ("published-hyper", "hyper", "fixed", "channelvit")


def _check_names(channels: Sequence[str]) -> list[str]:
    names = list(channels) if channels is not None else []
    if not names or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise ValueError(f"channels must be a non-empty list of distinct channel names, got {channels!r}")
    return names


def _mean_init(table: Tensor, names: list[str], unseen: Sequence[str], known: Sequence[str] | None, dim: int) -> None:
    """Set the slices (along ``dim``) of ``unseen`` channels to the mean of the ``known`` ones."""
    unseen = list(unseen)
    known = [c for c in names if c not in unseen] if known is None else list(known)
    for c in [*unseen, *known]:
        if c not in names:
            raise ValueError(f"unknown channel {c!r}; known: {', '.join(names)}")
    if not known or set(unseen) & set(known):
        raise ValueError(f"need at least one known channel, disjoint from the unseen ones (unseen={unseen}, known={known})")
    with torch.no_grad():
        mean = table.index_select(dim, torch.tensor([names.index(c) for c in known], device=table.device)).mean(dim, keepdim=True)
        for c in unseen:
            table.narrow(dim, names.index(c), 1).copy_(mean)


def _check_mean_rule(rule: str, stem: str) -> None:
    if rule != "mean":
        raise ValueError(f"the {stem} stem gives unseen channels the mean of the known ones only (rule='mean'); "
                         f"DiChaViT's rules ({rule!r}) are implemented for the hyper stems")


class FixedChannelPatchEmbed(nn.Module):
    """A plain p x p patch projection over all known channels. A batch with a subset S of them is
    zero-filled to the full set and rescaled by C / |S| (so the input's total scale is kept), as
    the ViT baseline of ChannelViT does under channel sampling."""

    def __init__(self, channels: Sequence[str], embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.channel_names = _check_names(channels)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(len(self.channel_names), embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        idx = resolve_channels(self.channel_names, channels, x.shape[1]).to(x.device)
        c = len(self.channel_names)
        if len(idx) == c and bool((idx == torch.arange(c, device=x.device)).all()):
            return self.proj(x)
        full = x.new_zeros(x.shape[0], c, *x.shape[2:])
        full[:, idx] = x * (c / len(idx))
        return self.proj(full)

    def init_unseen_channels(self, unseen: Sequence[str], known: Sequence[str] | None = None,
                             rule: str = "mean") -> None:
        """The input-channel slices of the projection for ``unseen`` channels become the mean of
        the ``known`` ones (an untrained slice would be random)."""
        _check_mean_rule(rule, "fixed")
        _mean_init(self.proj.weight, self.channel_names, unseen, known, dim=1)


class ChannelViTPatchEmbed(nn.Module):
    """ChannelViT's tokens: every channel's patches go through one shared 1-channel projection and
    get that channel's learned embedding added; output (B, |S|, N, D)."""

    def __init__(self, channels: Sequence[str], embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.channel_names = _check_names(channels)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)
        self.channel_embedding = nn.Parameter(torch.empty(len(self.channel_names), embed_dim))
        nn.init.trunc_normal_(self.channel_embedding, std=0.02)

    def forward(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        idx = resolve_channels(self.channel_names, channels, x.shape[1]).to(x.device)
        b, s, h, w = x.shape
        t = self.proj(x.reshape(b * s, 1, h, w)).flatten(2).transpose(1, 2)  # (B*S, N, D)
        t = t.reshape(b, s, t.shape[1], t.shape[2])
        return t + self.channel_embedding[idx][None, :, None, :]

    def init_unseen_channels(self, unseen: Sequence[str], known: Sequence[str] | None = None,
                             rule: str = "mean") -> None:
        """An unseen channel's embedding becomes the mean of the known channels' embeddings."""
        _check_mean_rule(rule, "channelvit")
        _mean_init(self.channel_embedding, self.channel_names, unseen, known, dim=0)


class ChannelAdaptiveViT(nn.Module):
    """A small ViT classifier whose first layer accepts any subset and order of its channels.

    Args:
        channels: names of the known input channels.
        stem: "published-hyper", "hyper", "fixed" or "channelvit" (see the module docstring).
        num_classes, img_size (square), patch_size, embed_dim, depth, num_heads, mlp_ratio, dropout:
            the usual ViT sizes.
        metadata, embedding_size, hidden_size, reduction (default "mean"): for stem="hyper" (see
            ``ChannelHyperPatchEmbed``); ``metadata`` switches on metadata conditioning.
            ``embedding_size`` and ``hidden_size`` also size the published stem (default 256 each
            there), with ``out_divisor`` (8).

    ``forward(x, channels=None)`` -> logits (B, num_classes); ``forward_features`` -> (B, embed_dim).
    """

    def __init__(self, channels: Sequence[str] = ("red", "green", "blue"), stem: str = "hyper", num_classes: int = 10,
                 img_size: int = 32, patch_size: int = 4, embed_dim: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, metadata: Mapping[str, Sequence[float]] | None = None,
                 embedding_size: int | None = None, hidden_size: int | None = None, reduction: str | None = None,
                 out_divisor: int = 8) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem != "hyper" and metadata is not None:
            raise ValueError(f"metadata conditioning needs stem='hyper', got stem={stem!r}")
        for name, v in (("num_classes", num_classes), ("img_size", img_size), ("patch_size", patch_size),
                        ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
        self.stem_kind, self.img_size, self.patch_size = stem, img_size, patch_size
        if stem == "published-hyper":
            if reduction not in (None, "sum"):
                raise ValueError(f"the published HyperNet sums over the channels present; reduction={reduction!r} "
                                 "is for stem='hyper'")
            self.stem = PublishedHyperPatchEmbed(channels, embed_dim, patch_size,
                                                 embedding_size=256 if embedding_size is None else embedding_size,
                                                 hidden_size=256 if hidden_size is None else hidden_size,
                                                 out_divisor=out_divisor)
        elif stem == "hyper":
            self.stem = ChannelHyperPatchEmbed(channels, embed_dim, patch_size,
                                               embedding_size=32 if embedding_size is None else embedding_size,
                                               hidden_size=hidden_size, metadata=metadata,
                                               reduction="mean" if reduction is None else reduction)
        elif stem == "fixed":
            self.stem = FixedChannelPatchEmbed(channels, embed_dim, patch_size)
        else:
            self.stem = ChannelViTPatchEmbed(channels, embed_dim, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, embed_dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def channel_names(self) -> list[str]:
        return self.stem.channel_names

    def init_unseen_channels(self, unseen: Sequence[str], known: Sequence[str] | None = None,
                             rule: str = "mean") -> None:
        """Give channels that were never trained an embedding by ``rule`` (default: the mean of the
        trained channels' embeddings, or projection slices for the fixed stem; the hyper stems also
        take DiChaViT's rules, ``hypernetworks.nn.channels.UNSEEN_RULES``); a no-op under metadata
        conditioning."""
        self.stem.init_unseen_channels(unseen, known, rule=rule)

    def add_channel(self, name: str, metadata: Sequence[float] | None = None) -> int:
        if self.stem_kind not in ("hyper", "published-hyper"):
            raise ValueError(f"add_channel is implemented for the hyper stems only (this model: {self.stem_kind!r})")
        return self.stem.add_channel(name, metadata)

    def tokens(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"x must be (B, C, {self.img_size}, {self.img_size}), got shape {tuple(x.shape)}")
        t = self.stem(x, channels)
        if self.stem_kind == "channelvit":  # (B, S, N, D): positions shared by the channels
            return (t + self.pos_embed[:, None]).flatten(1, 2)
        return t.flatten(2).transpose(1, 2) + self.pos_embed

    def forward_features(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        t = self.tokens(x, channels)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.norm(self.blocks(t)[:, 0])

    def forward(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        return self.head(self.forward_features(x, channels))


_SIZES = {
    "s16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, img_size=224),
    "s8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, img_size=224),
    "tiny-p4": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, img_size=32),
}
_STEM_PREFIX = {"published-hyper": "published-hypernet-vit", "hyper": "hypernet-vit", "fixed": "fixed-vit",
                "channelvit": "channelvit"}


def _make_factory(stem: str, size: str):
    def factory(**overrides) -> ChannelAdaptiveViT:
        kwargs = {**_SIZES[size], "stem": stem, **overrides}
        if stem == "hyper":
            # Generator hidden size d = 8: the generator's output layer (d x D p^2) then stays
            # near the size of an 8-channel patch projection, so the HyperNet ViT matches the
            # baselines' parameter count (d = N_z = 32 would add ~3M at ViT-S/16).
            kwargs.setdefault("hidden_size", 8)
        return ChannelAdaptiveViT(**kwargs)

    factory.__name__ = f"{_STEM_PREFIX[stem]}_{size}".replace("-", "_")
    factory.__doc__ = f"ChannelAdaptiveViT(stem={stem!r}) at size {size}: {_SIZES[size]}"
    return factory


for _stem, _prefix in _STEM_PREFIX.items():
    for _size in _SIZES:
        register_model(f"{_prefix}-{_size}")(_make_factory(_stem, _size))
