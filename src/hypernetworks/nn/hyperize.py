"""``hyperize(model)``: a static hypernetwork (paper section 3.1) on any PyTorch model, and back.

    model = hyperize(MyCNN())            # chosen layers' weights now made by one shared generator
    print(model.hyperize_report)         # which layers are generated, which stay ordinary and why
    ...train...
    plain = materialise(model)           # MyCNN again, generated weights written in
    MyCNN().load_state_dict(plain.state_dict(), strict=True)

Each chosen ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` / ``nn.Linear`` keeps its class and forward;
its ``weight`` (``in_proj_weight`` for an ``nn.MultiheadAttention``) becomes a ``TiledWeight`` parametrization (torch.nn.utils.parametrize): a grid of
basic (tile_out x tile_in x kernel) tiles, each made by a KernelGenerator from its own embedding z
of N_z numbers. Layers with the same kernel shape share one generator (``share="all"``), as the
paper's Hyper WRN does, or one per distinct weight shape (``share="shape"``). A forward pre-hook on
the model makes every tile of every layer in one batched generator call per generator.

Initialisation after hyperize: a generated weight read outside the model's forward
(``layer.weight``, ``.data``, views) intercepts in-place writes. Zero-mean random initialisations
(``nn.init.normal_``, symmetric ``uniform_``, ``kaiming_*``, ``xavier_*``, ``trunc_normal_`` with
symmetric bounds, or ``weight.data.normal_(0, std)``) re-draw that layer's embeddings and scale
them to the requested standard deviation; any other write (constants, ``copy_``, ``orthogonal_``,
a non-zero mean, a slice, assigning a tensor) raises a RuntimeError naming the layer.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from hypernetworks.nn.static import BatchedGeneration, KernelGenerator, TiledWeight, generate_kernels

__all__ = ["hyperize", "HyperizeReport", "SUPPORTED_LAYERS", "accept_hyperconv2d_state_dicts"]

#: Layer types whose weight hyperize can generate: (out, in[/groups], *kernel) weights, the
#: (in, out/groups, *kernel) weights of the transposed convolutions, and the (3 E, E)
#: ``in_proj_weight`` of nn.MultiheadAttention (its out_proj is an nn.Linear).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                 nn.ConvTranspose2d, nn.ConvTranspose3d, nn.MultiheadAttention)


def _weight_name(m: nn.Module) -> str | None:
    """The name of the weight hyperize would generate in ``m``, or None."""
    if isinstance(m, nn.MultiheadAttention):  # separate q/k/v weights when kdim/vdim differ: not supported
        return "in_proj_weight" if m._qkv_same_embed_dim else None
    return "weight" if isinstance(m, SUPPORTED_LAYERS) else None

LayerSpec = Union[None, str, Iterable[str], type, tuple, Callable[[str, nn.Module], bool]]


@dataclass
class LayerEntry:
    name: str        # qualified parameter name, e.g. "block1.0.conv1.weight"
    kind: str        # the module's class name
    shape: tuple[int, ...]
    generated: bool
    detail: str      # tiles and generator if generated, else the reason it stays ordinary


class HyperizeReport:
    """What ``hyperize`` did, layer by layer (``print(model.hyperize_report)``)."""

    def __init__(self, entries: list[LayerEntry], generators: dict[str, KernelGenerator]) -> None:
        self.entries, self.generators = entries, generators

    @property
    def generated(self) -> list[str]:
        return [e.name for e in self.entries if e.generated]

    @property
    def ordinary(self) -> dict[str, str]:
        """{parameter name: why it stays ordinary}"""
        return {e.name: e.detail for e in self.entries if not e.generated}

    def __str__(self) -> str:
        rows = [("weight", "layer", "shape", "status", "tiles / why ordinary")]
        rows += [(e.name, e.kind, "x".join(map(str, e.shape)), "generated" if e.generated else "ordinary", e.detail)
                 for e in self.entries]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(r)).rstrip() for r in rows]
        gens = ", ".join(f"{k} (N_z {g.embedding_size}, {sum(p.numel() for p in g.parameters()):,} parameters)"
                         for k, g in self.generators.items())
        n = len(self.generated)
        return "\n".join([*lines, f"{n} generated weight{'s' * (n != 1)}; generators: {gens}"])

    __repr__ = __str__


def _qual(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _tile_key(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _selector(layers: LayerSpec) -> tuple[Callable[[str, nn.Module], bool], bool]:
    """(predicate(name, module), explicit?) from the ``layers`` argument."""
    if layers is None:
        return (lambda name, m: True), False
    if isinstance(layers, str):
        return (lambda name, m: fnmatch.fnmatchcase(name, layers)), True
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        types = layers if isinstance(layers, tuple) else (layers,)
        bad = [t.__name__ for t in types if not issubclass(t, SUPPORTED_LAYERS)]
        if bad:
            raise ValueError(f"layers: {', '.join(bad)} cannot be generated; supported: "
                             f"{', '.join('nn.' + t.__name__ for t in SUPPORTED_LAYERS)}")
        return (lambda name, m: isinstance(m, types)), True
    if callable(layers):
        return layers, True
    if isinstance(layers, Iterable):
        patterns = list(layers)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"layers: a list must hold name patterns (str), got {layers!r}")
        return (lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)), True
    raise TypeError("layers must be None, a name pattern, a list of patterns, a layer type (or tuple of types) "
                    f"or a predicate (name, module) -> bool; got {type(layers).__name__}")


def _tile_size(tile_size) -> tuple[int, int]:
    ts = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    if len(ts) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in ts):
        raise ValueError(f"tile_size must be a positive int or (out, in) positive ints, got {tile_size!r}")
    return ts  # type: ignore[return-value]


def _misfit(m: nn.Module, weight: torch.Tensor, tile: tuple[int, int]) -> str | None:
    """Why this layer's weight cannot be tiled, or None."""
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(m, nn.Linear):
        labels = ("out_features", "in_features")
    elif isinstance(m, nn.MultiheadAttention):
        labels = ("3 x embed_dim", "embed_dim")
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):  # torch stores (in, out/groups, *kernel)
        labels = ("in_channels", "out_channels/groups")
    else:
        labels = ("out_channels", "in_channels/groups")
    bad = [f"{lbl} {n} is not a multiple of {t}" for lbl, n, t in zip(labels, weight.shape[:2], tile) if n % t]
    return "; ".join(bad) or None


def _target_std(init, weight: torch.Tensor) -> float | None:
    if weight.is_meta:  # shapes only (e.g. parameter counts): nothing to initialise
        return None
    if init == "match":
        return float(weight.detach().float().std())
    if init == "kaiming":  # Kaiming normal, fan-in, ReLU gain
        return math.sqrt(2.0 / math.prod(weight.shape[1:]))
    if init == "generator":
        return None
    return float(init)


def hyperize(model: nn.Module, layers: LayerSpec = None, *, tile_size: int | tuple[int, int] = 16,
             embedding_size: int = 64, hidden_size: int | None = None, share: str = "all",
             init: str | float = "match", strict: bool | None = None, inplace: bool = False) -> nn.Module:
    """Make the weights of ``model``'s chosen layers with a static hypernetwork.

    Args:
        model: any ``nn.Module``.
        layers: which layers (nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.MultiheadAttention's
            in_proj_weight) to generate. None (default): every one
            whose weight is a whole grid of basic tiles; the others stay ordinary and the report
            says why. Or a name pattern (``"features.*"``, fnmatch on qualified module names), a
            list of patterns, a layer type or tuple of types, or a predicate ``(name, module) -> bool``.
        tile_size: the basic tile's (out, in) channels (an int for both); its kernel is the layer's.
        embedding_size: N_z, numbers per tile embedding. hidden_size: the generator's d (default N_z).
        share: "all": one generator per tile shape (one for a net of 3x3 convs, as in the paper);
            "shape": one generator per distinct weight shape (relaxed sharing within each shape).
        init: each generated weight starts with the standard deviation of ...
            "match": the layer's own weight as given (i.e. its ordinary initialisation; default),
            "kaiming": Kaiming normal (fan-in, ReLU; torch's fan-in convention, i.e. dim 1 of the weight,
            for transposed convolutions too), a float: that std, "generator": whatever the
            generator's single-tile initialisation gives (the paper's set-up, no per-layer scale).
            Done by scaling each layer's embeddings (the kernel is linear in z at initialisation).
        strict: refuse (ValueError naming the layer and shapes) a selected layer that cannot be
            generated, instead of leaving it ordinary. Default: True when ``layers`` is given.
        inplace: change ``model`` itself instead of a deep copy.

    Returns the model (same class, same forward) with the chosen weights parametrized;
    ``model.hyperize_report`` lists every weight-bearing layer. ``materialise(model)`` gives back
    the plain model with the generated weights written in.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, TiledWeight) for m in model.modules()):
        raise ValueError("model is already hyperized (it has generated weights); materialise it first")
    for name, v in (("embedding_size", embedding_size), ("hidden_size", hidden_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if share not in ("all", "shape"):
        raise ValueError(f"share must be 'all' or 'shape', got {share!r}")
    if not (init in ("match", "kaiming", "generator")
            or (isinstance(init, (int, float)) and not isinstance(init, bool) and init >= 0)):
        raise ValueError(f"init must be 'match', 'kaiming', 'generator' or a std >= 0, got {init!r}")
    tile = _tile_size(tile_size)
    select, explicit = _selector(layers)
    strict = explicit if strict is None else strict
    if not inplace:
        model = copy.deepcopy(model)

    entries: list[LayerEntry] = []
    chosen: list[tuple[str, nn.Module, str]] = []
    for name, m in model.named_modules():
        if name.startswith("parametrizations.") or ".parametrizations." in name:
            continue  # the insides of existing parametrizations (their layer is reported)
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            entries.append(LayerEntry(_qual(name, "weight"), type(m).__name__, (), False,
                                      "a lazy layer whose shape is not known yet (run one forward first)"))
            continue
        own = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        wname = _weight_name(m)
        why = (f"{type(m).__name__} is not a supported layer type "
               f"({', '.join('nn.' + t.__name__ for t in SUPPORTED_LAYERS)})")
        if isinstance(m, nn.MultiheadAttention) and wname is None:
            why = "nn.MultiheadAttention with kdim/vdim other than embed_dim (separate q, k, v weights)"
        if wname is not None and parametrize.is_parametrized(m, wname):
            why = "its weight already has a parametrization"  # weight_norm, spectral_norm, ...
            own.insert(0, (wname, getattr(m, wname)))
            wname = None
        kind = parametrize.type_before_parametrizations(m).__name__
        if wname is not None:
            own = [(pn, p) for pn, p in own if pn != wname]
            w = getattr(m, wname)
            row = (_qual(name, wname), type(m).__name__, tuple(w.shape))
            if not select(name, m):
                entries.append(LayerEntry(*row, False, "not selected"))
            elif (misfit := _misfit(m, w, tile)) is not None:
                if strict:
                    raise ValueError(f"hyperize: layer {name or '(the model itself)'!r} ({type(m).__name__}, {wname} "
                                     f"{tuple(w.shape)}) cannot be made of {tile[0]}x{tile[1]} tiles: {misfit}")
                entries.append(LayerEntry(*row, False, misfit))
            else:
                chosen.append((name, m, wname))
                entries.append(LayerEntry(*row, True, ""))
        for pn, p in own:  # other weight matrices stay ordinary: say so
            entries.append(LayerEntry(_qual(name, pn), kind, tuple(p.shape), False, why))
    if isinstance(layers, (str, list)):  # a pattern that matches no layer is a typo: say so
        names = [n for n, _ in model.named_modules()]
        missing = [p for p in ([layers] if isinstance(layers, str) else layers)
                   if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if missing:
            raise ValueError(f"hyperize: no module of {type(model).__name__} is named like {missing}; "
                             f"layer names: {', '.join(e.name.rsplit('.', 1)[0] for e in entries)}")
    if not chosen:
        report = HyperizeReport(entries, {})
        raise ValueError(f"hyperize: no layer of {type(model).__name__} can be generated with {tile[0]}x{tile[1]} "
                         f"tiles (layers={layers!r}):\n{report}")

    # One generator per tile shape (or per weight shape), made where the layer's weight lives.
    generators: dict[str, KernelGenerator] = {}
    tiled: list[TiledWeight] = []
    targets: list[float | None] = []
    for name, m, wname in chosen:
        w = getattr(m, wname)
        kernel = tuple(w.shape[2:])
        key = _tile_key((*tile, *kernel) if share == "all" else tuple(w.shape))
        new = key not in generators
        if new:
            generators[key] = KernelGenerator(embedding_size, tile[1], tile[0], kernel, hidden_size).to(
                device=w.device, dtype=w.dtype)
        t = TiledWeight(generators[key], w.shape, own_generator=new)
        t.layer_name = f"layer {name or '(the model itself)'!r} ({type(m).__name__}, {wname})"  # for its errors
        targets.append(_target_std(init, w))
        parametrize.register_parametrization(m, wname, t, unsafe=True)  # shapes hold by construction
        tiled.append(t)
    for e in entries:
        if e.generated:
            t = tiled[[_qual(n, wn) for n, _, wn in chosen].index(e.name)]
            key = next(k for k, g in generators.items() if g is t.generator)
            e.detail = f"{t.out_tiles}x{t.in_tiles} tiles of {key}"

    if any(s is not None for s in targets):
        with torch.no_grad():  # scale each layer's z so that its kernel starts with the target std
            for t, kernel, target in zip(tiled, generate_kernels(tiled), targets):
                std = float(kernel.float().std()) if kernel.numel() > 1 else 0.0
                if target is not None and std > 0:
                    t.z.mul_(target / std)

    hook = BatchedGeneration()  # all tiles of all layers in one call per generator, per forward
    model.register_forward_pre_hook(hook)
    model.register_forward_hook(hook, always_call=True)
    model.hyperize_report = HyperizeReport(entries, generators)
    return model


def accept_hyperconv2d_state_dicts(model: nn.Module, generator_name: str = "generator") -> nn.Module:
    """Let a hyperized ``model`` load state_dicts saved by the same architecture built from
    HyperConv2d layers and a shared generator registered as ``generator_name`` (this project's
    MNIST and WRN models before they were made with hyperize): ``<layer>.z`` and
    ``<generator_name>.<p>`` are renamed to this model's keys before loading. Returns ``model``."""
    owner = next((n for n, m in model.named_modules() if isinstance(m, TiledWeight) and hasattr(m, "own_generator")),
                 None)
    if owner is None or len({id(t.generator) for t in model.modules() if isinstance(t, TiledWeight)}) != 1:
        raise ValueError("accept_hyperconv2d_state_dicts needs a model hyperized with one shared generator")
    layers = {n.split(".parametrizations.")[0]: n for n, m in model.named_modules() if isinstance(m, TiledWeight)}
    model.register_load_state_dict_pre_hook(_HyperConv2dKeys(layers, f"{owner}.own_generator", generator_name))
    return model


class _HyperConv2dKeys:
    """load_state_dict pre-hook of accept_hyperconv2d_state_dicts (names only: deep copies stay right)."""

    hyperize_only = True  # materialise drops it: the plain model has no such keys

    def __init__(self, layers: dict[str, str], generator: str, old_generator: str) -> None:
        self.layers, self.generator, self.old_generator = layers, generator, old_generator

    def __call__(self, module, state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            layer, _, leaf = key[len(prefix):].rpartition(".")
            if leaf == "z" and layer in self.layers:
                state_dict[f"{prefix}{self.layers[layer]}.z"] = state_dict.pop(key)
            elif layer == self.old_generator:
                state_dict[f"{prefix}{self.generator}.{leaf}"] = state_dict.pop(key)
