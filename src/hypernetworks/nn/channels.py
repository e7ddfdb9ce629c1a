"""Channel-adaptive first layers for multi-channel imaging (satellite bands, microscopy stains).

The static hypernetwork of section 3.1 applied across *input channels* instead of across layers:
every channel c has a small vector z_c, and the project's two-layer ``KernelGenerator`` turns it
into that channel's slice W_c (out x 1 x p x p) of the patch projection. A batch that carries
only some channels, in any order, gets a projection made of just their slices (one generator call):

    y = (1/|S|) sum_{c in S} conv(x_c, W_c)         W_c = G(z_c),  S = the channels present

so one model answers for every non-empty subset and order of its channels. Where z_c comes from:

* ``metadata=None``: a learned embedding per channel. A channel never trained gets the **mean of
  the trained embeddings** (``init_unseen_channels`` / ``add_channel``): the generator then makes
  the average of the known channels' kernels, the neutral guess; DiChaViT's other rules
  (``UNSEEN_RULES``) are available too.
* ``metadata={name: [numbers]}``: *metadata conditioning*. z_c = MLP(Fourier features of the
  channel's physical description, e.g. central wavelength and band width in nm), so a channel
  never seen in training gets weights from its description alone (``add_channel(name, metadata=...)``).

    embed = ChannelHyperPatchEmbed(["red", "green", "blue"], embed_dim=64, patch_size=4)
    y = embed(x[:, [2, 0]], channels=["blue", "red"])          # (B, 64, H/4, W/4)

This is the project's own variant (its KernelGenerator and initialisation, d = 8 in the ViT
factories, mean over the channels present). **The published HyperNet** of the channel-adaptive
literature (the "HyperNet" rows of CHAMMI, JUMP-CP and So2Sat in DiChaViT's code) is
``PublishedHyperPatchEmbed``: a learned embedding per channel (size 256, N(0, 1)), a two-layer
linear generator (hidden size 256) making a D/8-channel slice per channel, the slices applied as
one convolution -- a **sum** over the channels present, not divided by their number -- and a 1x1
convolution lifting D/8 to D; the generator's biases keep their N(0, 1) initialisation:

    y = lift( sum_{c in S} conv(x_c, W_c) ),   W_c = reshape((z_c W1 + b1) W2 + b2)

``sample_channels`` draws the hierarchical channel subsets (ChannelViT's HCS) used in training.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hypernetworks.nn.static import KernelGenerator

__all__ = ["ChannelHyperPatchEmbed", "PublishedHyperPatchEmbed", "UNSEEN_RULES", "resolve_channels",
           "sample_channels", "channel_subsets"]

# How a channel that training never saw gets its embedding at test time: "mean" (this project:
# the mean of the trained channels' embeddings, written into the table once) and DiChaViT's rules,
# applied at each forward to the unseen channels of the input in their order, with a pointer into
# a bank of trained channels (the model's channel order) that advances by one per unseen channel:
# "avg_2" / "avg_3" (mean of the next 2 / 3 bank channels), "replicate" (the next bank channel's),
# "zero" (a zero vector); "avg_2_not_in_chunk" / "avg_3_not_in_chunk" draw from the trained
# channels that are *not* in the input.
UNSEEN_RULES = ("mean", "avg_2", "avg_3", "replicate", "zero", "avg_2_not_in_chunk", "avg_3_not_in_chunk")

ChannelSpec = Sequence[str | int] | Tensor | None


def resolve_channels(known: Sequence[str], channels: ChannelSpec, num_inputs: int, *, arg: str = "channels") -> Tensor:
    """Indices (into ``known``) of the ``num_inputs`` input channels described by ``channels``
    (names or indices, in the input's order; None: all known channels in order). Raises
    ValueError for unknown names, out-of-range indices, duplicates, or a count that differs
    from the input's."""
    if channels is None:
        if num_inputs != len(known):
            raise ValueError(f"input has {num_inputs} channels but {arg}=None means all {len(known)} "
                             f"({', '.join(known)}); pass the names of the channels present")
        return torch.arange(len(known))
    if isinstance(channels, Tensor):
        if channels.dim() != 1 or channels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{arg} as a tensor must be 1-D integer indices, got {channels.dtype} {tuple(channels.shape)}")
        idx = [int(i) for i in channels.tolist()]
    elif isinstance(channels, str):
        raise TypeError(f"{arg} must be a sequence of channel names or indices, not the string {channels!r}")
    else:
        idx = []
        for c in channels:
            if isinstance(c, str):
                if c not in known:
                    raise ValueError(f"unknown channel {c!r} in {arg}; known: {', '.join(known)} "
                                     "(add a new one with add_channel)")
                idx.append(known.index(c))
            elif isinstance(c, int) and not isinstance(c, bool):
                idx.append(c)
            else:
                raise TypeError(f"{arg} entries must be str or int, got {type(c).__name__}")
    if not idx:
        raise ValueError(f"{arg} is empty: at least one channel is needed")
    if any(i < 0 or i >= len(known) for i in idx):
        raise ValueError(f"channel index out of range in {arg}={idx} (there are {len(known)} channels)")
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate channels in {arg}={idx}")
    if len(idx) != num_inputs:
        raise ValueError(f"{arg} names {len(idx)} channels but the input has {num_inputs}")
    return torch.tensor(idx, dtype=torch.long)


def sample_channels(num_channels: int, generator: torch.Generator | None = None) -> list[int]:
    """Hierarchical channel sampling (Bao et al., ChannelViT, 2023): first the number of channels
    k uniformly from 1..C, then k distinct channels uniformly; sorted indices. Unlike independent
    channel dropout this covers every subset size equally often. Uses torch's (seeded) RNG."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    k = int(torch.randint(1, num_channels + 1, (), generator=generator))
    return sorted(torch.randperm(num_channels, generator=generator)[:k].tolist())


def channel_subsets(names: Sequence[str]) -> list[list[str]]:
    """Every non-empty subset of ``names`` (2^C - 1 of them), smallest first, in ``names`` order."""
    n = len(names)
    subs = [[names[i] for i in range(n) if m >> i & 1] for m in range(1, 1 << n)]
    return sorted(subs, key=lambda s: (len(s), [names.index(c) for c in s]))



def _checked_channel_args(channels, **positive_ints) -> list[str]:
    """The channel names as a list, after checking them (non-empty, distinct strings) and that every
    keyword is a positive int; ValueError naming the argument otherwise."""
    names = list(channels) if channels is not None else []
    if not names or not all(isinstance(c, str) and c for c in names):
        raise ValueError(f"channels must be a non-empty list of channel names, got {channels!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"channels has duplicate names: {names}")
    for name, v in positive_ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return names

class _MetadataEncoder(nn.Module):
    """Physical description (M numbers) -> channel embedding z (N_z): standardise each number
    with statistics fixed at construction, Fourier features at octave frequencies (so nearby
    wavelengths get nearby codes, as in dynamic-wavelength remote-sensing models), two-layer MLP."""

    def __init__(self, num_features: int, embedding_size: int, num_frequencies: int, hidden: int,
                 mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.register_buffer("freqs", (2.0 ** torch.arange(num_frequencies)) * math.pi / 4)
        width = num_features * (1 + 2 * num_frequencies)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embedding_size))

    def forward(self, meta: Tensor) -> Tensor:
        m = (meta - self.mean) / self.std  # (C, M)
        ang = m.unsqueeze(-1) * self.freqs  # (C, M, F)
        feats = torch.cat([m.unsqueeze(-1), ang.sin(), ang.cos()], dim=-1).flatten(1)
        return self.mlp(feats)


class _UnseenChannels:
    """Unseen-channel rules for layers with a learned ``channel_embedding`` table (C, N_z) and
    ``channel_names``."""

    _unseen_rule: str | None = None
    _unseen_idx: tuple[int, ...] = ()
    _bank_idx: tuple[int, ...] = ()

    @torch.no_grad()
    def init_unseen_channels(self, unseen: Sequence[str], known: Sequence[str] | None = None,
                             rule: str = "mean") -> None:
        """Give each ``unseen`` channel (never trained) an embedding by ``rule`` (``UNSEEN_RULES``)
        from the ``known`` (trained) channels, default every other channel. "mean" writes the mean
        of the known embeddings into the table; DiChaViT's rules are applied at every forward
        (the substitute depends on which channels the input carries) until the next call.
        Metadata-conditioned layers need nothing: an unseen channel's z comes from its description."""
        if rule not in UNSEEN_RULES:
            raise ValueError(f"rule must be one of {UNSEEN_RULES}, got {rule!r}")
        if self.channel_embedding is None:
            return
        unseen = list(unseen)
        known = [c for c in self.channel_names if c not in unseen] if known is None else list(known)
        for c in [*unseen, *known]:
            if c not in self.channel_names:
                raise ValueError(f"unknown channel {c!r}; known: {', '.join(self.channel_names)}")
        if not known:
            raise ValueError("init_unseen_channels needs at least one known (trained) channel")
        if set(unseen) & set(known):
            raise ValueError(f"channels {sorted(set(unseen) & set(known))} are both unseen and known")
        ki = sorted(self.channel_names.index(c) for c in known)
        if rule == "mean":
            self._unseen_rule, self._unseen_idx, self._bank_idx = None, (), ()
            mean = self.channel_embedding[torch.tensor(ki)].mean(0)
            for c in unseen:
                self.channel_embedding[self.channel_names.index(c)] = mean
            return
        self._unseen_rule = rule
        self._unseen_idx = tuple(self.channel_names.index(c) for c in unseen)
        self._bank_idx = tuple(ki)

    def _learned_embeddings(self, idx: Tensor | None) -> Tensor:
        z = self.channel_embedding
        if idx is None:
            idx = torch.arange(len(self.channel_names))
        idx = idx.to(z.device)
        out = z[idx]
        rule = self._unseen_rule
        if rule is None or not any(int(i) in self._unseen_idx for i in idx):
            return out
        present = [int(i) for i in idx]
        bank = [k for k in self._bank_idx if k not in present] if rule.endswith("_not_in_chunk") else list(self._bank_idx)
        if not bank:
            raise ValueError(f"unseen-channel rule {rule!r}: no trained channel outside the input to draw from")
        rows, cur = [], 0
        for pos, i in enumerate(present):
            if i not in self._unseen_idx:
                rows.append(out[pos])
                continue
            if rule == "zero":
                rows.append(torch.zeros_like(out[pos]))
            else:
                take = {"replicate": 1, "avg_2": 2, "avg_2_not_in_chunk": 2, "avg_3": 3, "avg_3_not_in_chunk": 3}[rule]
                pick = [bank[(cur + j) % len(bank)] for j in range(take)]
                rows.append(z[torch.tensor(pick, device=z.device)].mean(0))
            cur = (cur + 1) % len(bank)
        return torch.stack(rows)


class ChannelHyperPatchEmbed(_UnseenChannels, nn.Module):
    """Channel-adaptive patch projection: each channel's kernel slice is generated from its
    embedding (learned, or computed from its metadata) by one shared ``KernelGenerator``.

    Args:
        channels: names of the channels the model knows (order defines the indices).
        embed_dim: output channels (the ViT width).
        patch_size: p; the projection is a p x p convolution with stride p.
        embedding_size: N_z, size of a channel's embedding.
        hidden_size: d, the generator's hidden size (default N_z).
        metadata: None for learned embeddings; else ``{name: [numbers]}`` for every channel
            (same length for all), e.g. ``{"red": [610, 90], ...}`` (central wavelength, width).
        metadata_frequencies, metadata_hidden: the metadata encoder's Fourier features per number
            and MLP width.
        reduction: "mean" (default: divide by the number of channels present, so the output's
            scale does not depend on how many channels a batch has) or "sum" (a plain conv).
        bias: add a learned bias (embed_dim) after the projection.

    ``forward(x, channels=None)``: x (B, |S|, H, W) and the names/indices of its channels, in
    order (None: all known channels) -> (B, embed_dim, H/p, W/p).
    """

    def __init__(self, channels: Sequence[str], embed_dim: int, patch_size: int, *, embedding_size: int = 32,
                 hidden_size: int | None = None, metadata: Mapping[str, Sequence[float]] | None = None,
                 metadata_frequencies: int = 4, metadata_hidden: int = 64, reduction: str = "mean",
                 bias: bool = True) -> None:
        super().__init__()
        names = _checked_channel_args(channels, embed_dim=embed_dim, patch_size=patch_size,
                                      embedding_size=embedding_size)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.channel_names = names
        self.embed_dim, self.patch_size, self.embedding_size, self.reduction = embed_dim, patch_size, embedding_size, reduction
        # in_size=1: the generator makes one channel's (embed_dim, 1, p, p) slice per embedding.
        self.generator = KernelGenerator(embedding_size, 1, embed_dim, patch_size, hidden_size)
        self.bias = nn.Parameter(torch.zeros(embed_dim)) if bias else None
        if metadata is None:
            self.channel_embedding = nn.Parameter(torch.randn(len(names), embedding_size))
            self.metadata_encoder = None
        else:
            meta = self._metadata_tensor(metadata, names)
            std = meta.std(0, unbiased=False) if len(names) > 1 else torch.ones(meta.shape[1])
            std = torch.where(std > 0, std, torch.ones_like(std))
            self.channel_embedding = None
            self.register_buffer("channel_metadata", meta)
            self.metadata_encoder = _MetadataEncoder(meta.shape[1], embedding_size, metadata_frequencies,
                                                     metadata_hidden, meta.mean(0), std)

    @staticmethod
    def _metadata_tensor(metadata: Mapping[str, Sequence[float]], names: Sequence[str]) -> Tensor:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping name -> list of numbers, got {type(metadata).__name__}")
        missing = [c for c in names if c not in metadata]
        if missing:
            raise ValueError(f"metadata has no entry for channels {missing}")
        rows = [[float(v) for v in metadata[c]] for c in names]
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError(f"metadata entries must be non-empty lists of the same length, got {dict(zip(names, rows))}")
        if not all(math.isfinite(v) for r in rows for v in r):
            raise ValueError(f"metadata must be finite numbers, got {dict(zip(names, rows))}")
        return torch.tensor(rows, dtype=torch.float32)

    @property
    def conditioning(self) -> str:
        return "learned" if self.metadata_encoder is None else "metadata"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"generator": list(self.generator.parameters())}
        if self.channel_embedding is not None:
            groups["embeddings"] = [self.channel_embedding]
        else:
            groups["metadata_encoder"] = list(self.metadata_encoder.parameters())
        return groups

    def embeddings(self, idx: Tensor | None = None) -> Tensor:
        """z of the channels ``idx`` (all when None): (len(idx), N_z)."""
        if self.channel_embedding is not None:
            return self._learned_embeddings(idx)
        meta = self.channel_metadata if idx is None else self.channel_metadata[idx.to(self.channel_metadata.device)]
        return self.metadata_encoder(meta)

    def kernels(self, idx: Tensor | None = None) -> Tensor:
        """The generated projection (embed_dim, len(idx), p, p) for the channels ``idx``, in that
        order, from one generator call."""
        k = self.generator(self.embeddings(idx))  # (S, D, 1, p, p)
        return k.squeeze(2).transpose(0, 1)

    def forward(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        idx = resolve_channels(self.channel_names, channels, x.shape[1])
        w = self.kernels(idx)
        if self.reduction == "mean":
            w = w / len(idx)
        return F.conv2d(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), stride=self.patch_size)

    # --------------------------------------------------------------- unseen channels

    @torch.no_grad()
    def add_channel(self, name: str, metadata: Sequence[float] | None = None) -> int:
        """Register a channel the model has never seen and return its index. Learned embeddings:
        it starts at the mean of the existing embeddings. Metadata conditioning: ``metadata``
        (same length as the others) is required and gives it its weights."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self.channel_names:
            raise ValueError(f"channel {name!r} is already known")
        if self.channel_embedding is not None:
            if metadata is not None:
                raise ValueError("this layer uses learned embeddings; metadata is only for metadata conditioning")
            z = self.channel_embedding
            self.channel_embedding = nn.Parameter(torch.cat([z, z.mean(0, keepdim=True)]), requires_grad=z.requires_grad)
        else:
            if metadata is None:
                raise ValueError(f"metadata conditioning: add_channel({name!r}) needs the channel's metadata")
            row = self._metadata_tensor({name: metadata}, [name]).to(self.channel_metadata)
            if row.shape[1] != self.channel_metadata.shape[1]:
                raise ValueError(f"metadata for {name!r} has {row.shape[1]} numbers, the others "
                                 f"{self.channel_metadata.shape[1]}")
            self.channel_metadata = torch.cat([self.channel_metadata, row])
        self.channel_names.append(name)
        return len(self.channel_names) - 1

    def extra_repr(self) -> str:
        return (f"channels={self.channel_names}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"conditioning={self.conditioning}, reduction={self.reduction}")


class PublishedHyperPatchEmbed(_UnseenChannels, nn.Module):
    """The published HyperNet patch embedding (DiChaViT's ``HyperNetViT`` stem with its default
    settings, the "HyperNet" baseline of the CHAMMI / JUMP-CP / So2Sat tables), written from its
    equations: a learned embedding z_c per channel; a two-layer linear generator

        a_c = z_c W1 + b1                 (N_z -> d)
        W_c = a_c W2 + b2                 (d -> D/r * p * p, reshaped to (D/r, p, p))

    whose slices W_c of the channels present form one p x p, stride-p convolution (a sum over
    the channels), followed by a 1x1 convolution from D/r to D channels (with bias).

    Initialisation as published: z ~ N(0, 1) (``nn.Embedding``); W1 (N_z, 1, d) and W2
    (d, D/r, p, p) Kaiming-normal (std sqrt(2 / fan_in) with torch's fan-in of those shapes: d and
    D/r p^2); the biases b1 (1, d) and b2 (D/r, p, p) ~ N(0, 1); the 1x1 convolution torch's default.

    Args:
        channels: names of the channels the model knows.
        embed_dim: D, the output channels (the ViT width).
        patch_size: p.
        embedding_size: N_z (published: 256).
        hidden_size: d (published: 256).
        out_divisor: r; the generator makes D / r channels (published: 8).

    ``forward(x, channels=None)`` -> (B, D, H/p, W/p). Unseen channels: ``init_unseen_channels``
    with any of ``UNSEEN_RULES`` (DiChaViT's rules, and "mean").
    """

    conditioning = "learned"
    reduction = "sum"

    def __init__(self, channels: Sequence[str], embed_dim: int, patch_size: int, *, embedding_size: int = 256,
                 hidden_size: int = 256, out_divisor: int = 8) -> None:
        super().__init__()
        names = _checked_channel_args(channels, embed_dim=embed_dim, patch_size=patch_size,
                                      embedding_size=embedding_size, hidden_size=hidden_size, out_divisor=out_divisor)
        if embed_dim % out_divisor:
            raise ValueError(f"embed_dim={embed_dim} is not a multiple of out_divisor={out_divisor}")
        self.channel_names = names
        self.embed_dim, self.patch_size, self.embedding_size, self.hidden_size = embed_dim, patch_size, embedding_size, hidden_size
        self.generated_dim = embed_dim // out_divisor
        self.channel_embedding = nn.Parameter(torch.randn(len(names), embedding_size))
        self.w_in = nn.Parameter(torch.empty(embedding_size, 1, hidden_size))
        self.b_in = nn.Parameter(torch.randn(1, hidden_size))
        self.w_out = nn.Parameter(torch.empty(hidden_size, self.generated_dim, patch_size, patch_size))
        self.b_out = nn.Parameter(torch.randn(self.generated_dim, patch_size, patch_size))
        nn.init.kaiming_normal_(self.w_in)
        nn.init.kaiming_normal_(self.w_out)
        self.lift = nn.Conv2d(self.generated_dim, embed_dim, kernel_size=1)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": [self.w_in, self.b_in, self.w_out, self.b_out], "embeddings": [self.channel_embedding],
                "lift": list(self.lift.parameters())}

    def embeddings(self, idx: Tensor | None = None) -> Tensor:
        return self._learned_embeddings(idx)

    def kernels(self, idx: Tensor | None = None) -> Tensor:
        """The generated projection (D/r, len(idx), p, p) for the channels ``idx``, in that order."""
        z = self.embeddings(idx)  # (S, N_z)
        a = z @ self.w_in[:, 0, :] + self.b_in[0]  # (S, d)
        k = torch.einsum("sd,dohw->sohw", a, self.w_out) + self.b_out  # (S, D/r, p, p)
        return k.transpose(0, 1)

    def forward(self, x: Tensor, channels: ChannelSpec = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        idx = resolve_channels(self.channel_names, channels, x.shape[1])
        y = F.conv2d(x, self.kernels(idx).to(x.dtype), None, stride=self.patch_size)
        return self.lift(y)

    @torch.no_grad()
    def add_channel(self, name: str, metadata: Sequence[float] | None = None) -> int:
        """Register a channel never seen; it starts at the mean of the existing embeddings."""
        if metadata is not None:
            raise ValueError("the published HyperNet uses learned embeddings only; metadata is not supported")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self.channel_names:
            raise ValueError(f"channel {name!r} is already known")
        z = self.channel_embedding
        self.channel_embedding = nn.Parameter(torch.cat([z, z.mean(0, keepdim=True)]), requires_grad=z.requires_grad)
        self.channel_names.append(name)
        return len(self.channel_names) - 1

    def extra_repr(self) -> str:
        return (f"channels={self.channel_names}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"embedding_size={self.embedding_size}, hidden_size={self.hidden_size}, "
                f"generated_dim={self.generated_dim}, reduction=sum")
