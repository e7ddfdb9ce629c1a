"""The torch.nn.LSTM-style front end shared by every recurrent layer of the package.

A *cell* here provides:
  ``state_sizes``               sizes of its state tensors, e.g. (H, H) or (H, H, H_hat, H_hat);
  ``input_projection(x)``       the input-side products for a whole (T, B, I) sequence at once;
  ``step(xw_t, state, record)`` one time step -> (h_t, new_state); ``record`` is None or a dict
                                that collects per-step activity for analysis;
  optionally ``fused_forward(x, state)`` -> (outputs, state) or None: a fused whole-sequence
                                path over the raw (T, B, I) input, used when nothing is recorded
                                and no sequence is padded (None: not available, run ``step``);
  optionally ``tensor_state = True``: the cell's state may also be given as one tensor (nn.RNN).

``RecurrentLayers`` turns a stack of such cells (one per layer and direction) into a module with
nn.LSTM's contract: input forms (time-major, batch_first, unbatched, PackedSequence), initial
state, inter-layer dropout, bidirectional layers, validation of shapes and dtypes, and the final
state as a tuple of (num_layers * num_directions, B, size) tensors.

State forms (``hx`` in, state out; the state comes back in the form it went in):
  * the full tuple, one tensor per entry of ``state_sizes`` (the default when ``hx`` is None);
  * for cells with more than two state tensors, nn.LSTM's pair ``(h, c)``: ``h`` is exactly the
    main h, and ``c`` is the main c alone (the rest of the state then starts at zero) or the main c
    with the rest of the state appended along the last dimension, which is what comes back. This
    is how the original TensorFlow HyperLSTMCell carried its hyper state inside its LSTM state;
  * for ``tensor_state`` cells, nn.RNN's single tensor: h alone or h with the rest appended.
"""
from __future__ import annotations

import functools
import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from hypernetworks.nn import _fused

State = tuple[torch.Tensor, ...]

FULL, PAIR, TENSOR = "full", "pair", "tensor"


def _check_dtype(module: nn.Module, x: torch.Tensor, name: str = "input") -> None:
    """Refuse what torch would only report as an internal matmul dtype error."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    p = next(module.parameters(), None)
    if p is not None and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {p.dtype}; convert one of "
                        f"them (e.g. module.to({x.dtype}) or {name}.to({p.dtype}))")


def _read_state(hx, sizes: Sequence[int], lead: tuple[int, ...], tensor_ok: bool, where: str, like: torch.Tensor):
    """``hx`` in any accepted form -> (list of state tensors or None per entry, form).

    ``lead`` is the expected leading shape, e.g. (num_layers * D, B), (B,) or (); ``like`` the
    input, whose dtype the state must share (outside autocast)."""
    if hx is None:
        return [None] * len(sizes), FULL
    if isinstance(hx, torch.Tensor):
        if not tensor_ok:
            raise ValueError(f"hx must be a tuple of tensors, e.g. (h_0, c_0) as for torch.nn.LSTM{where}")
        form, given = TENSOR, [hx]
    elif isinstance(hx, (tuple, list)):
        given = list(hx)
        if len(given) == len(sizes):
            form = FULL
        elif len(given) == 2 and len(sizes) > 2:
            form = PAIR
        else:
            raise ValueError(f"hx must be a tuple of {len(sizes)} tensors (the state this module returns) "
                             f"or nn.LSTM's (h_0, c_0); got {len(given)} tensors{where}")
    else:
        raise ValueError(f"hx must be a tuple of tensors, e.g. (h_0, c_0) as for torch.nn.LSTM; "
                         f"got {type(hx).__name__}{where}")
    autocast = torch.is_autocast_enabled(like.device.type)
    for k, g in enumerate(given):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"hx[{k}] must be a tensor, got {type(g).__name__}")
        if g.dtype != like.dtype and not autocast:
            raise TypeError(f"hx[{k}] has dtype {g.dtype} but the input has {like.dtype}")
    if form == FULL:
        for k, (g, n) in enumerate(zip(given, sizes)):
            if tuple(g.shape) != (*lead, n):
                raise ValueError(f"hx[{k}] has shape {tuple(g.shape)}, expected {(*lead, n)}")
        return given, form
    # PAIR: given[0] is h, given[-1] the c slot; TENSOR: given[0] is the h slot holding everything.
    head = 1 if form == PAIR else 0
    rest_sizes = list(sizes[head:])
    if form == PAIR:
        if tuple(given[0].shape) != (*lead, sizes[0]):
            raise ValueError(f"hx[0] has shape {tuple(given[0].shape)}, expected {(*lead, sizes[0])}")
    slot, k = given[-1], len(given) - 1
    short, full = (*lead, rest_sizes[0]), (*lead, sum(rest_sizes))
    if tuple(slot.shape) not in (short, full):
        raise ValueError(f"hx[{k}] has shape {tuple(slot.shape)}, expected {short} or, with the rest of the "
                         f"state appended, {full}")
    out = given[:head]
    if tuple(slot.shape) == full:
        out += list(slot.split(rest_sizes, dim=-1))
    else:
        out += [slot] + [None] * (len(rest_sizes) - 1)
    return out, form


def _write_state(state: State, form: str):
    if form == FULL:
        return tuple(state)
    if form == PAIR:
        return state[0], torch.cat(state[1:], dim=-1)
    return torch.cat(state, dim=-1)


def run_cell(cell: nn.Module, input: torch.Tensor, hx) -> State:
    """``cell(input, hx)`` for a single step: input (B, I) or unbatched (I,)."""
    if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
        raise ValueError(f"input must be a tensor of shape (batch, {cell.input_size}) or "
                         f"({cell.input_size},), got {_shape(input)}")
    if input.size(-1) != cell.input_size:
        raise ValueError(f"input has {input.size(-1)} features, expected input_size={cell.input_size}")
    _check_dtype(cell, input)
    batched = input.dim() == 2
    lead = (input.size(0),) if batched else ()
    given, form = _read_state(hx, cell.state_sizes, lead, getattr(cell, "tensor_state", False),
                              " (or nn.LSTMCell's (h, c))", input)
    state = [g if g is not None else input.new_zeros(*lead, n) for g, n in zip(given, cell.state_sizes)]
    xw = cell.input_projection(input.unsqueeze(0) if batched else input.view(1, 1, -1))
    if not batched:
        state = [s.unsqueeze(0) for s in state]
    _, new_state = cell.step(xw[0], tuple(state), None)
    if not batched:
        new_state = tuple(s.squeeze(0) for s in new_state)
    return _write_state(tuple(new_state), form)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _reverse_time(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Reverse each sequence of a time-major (T, B, ...) tensor within its own length.

    ``index`` (T, B) maps t -> length - 1 - t on real steps and t -> t on padding (it is its own
    inverse); None means every sequence spans all T steps."""
    if index is None:
        return t.flip(0)
    idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return t.gather(0, idx)


class _compiler_opaque:
    """Method decorator: ``torch.compiler.disable(method)``, applied on first use once torch.compile
    has loaded ``torch._dynamo`` (applying it at import would load dynamo, ~1 s, into every
    ``import hypernetworks``); until then nothing can be compiling and the plain method runs."""

    def __init__(self, fn):
        self.fn, self.disabled = fn, None
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls=None):
        fn = self.fn
        if "torch._dynamo" in sys.modules:
            if self.disabled is None:
                self.disabled = torch.compiler.disable(fn)
            fn = self.disabled
        return fn if obj is None else fn.__get__(obj, cls)


class RecurrentLayers(nn.Module):
    """A stack of recurrent cells with torch.nn.LSTM's forward contract.

    ``cells`` are the layers' forward-direction cells; ``reverse_cells``, when given, the
    backward direction of each layer (``bidirectional``), stored apart so that a unidirectional
    module keeps its state-dict keys."""

    def __init__(self, cells: Sequence[nn.Module], batch_first: bool = False, dropout: float = 0.0,
                 reverse_cells: Sequence[nn.Module] | None = None):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.cells = nn.ModuleList(cells)
        if reverse_cells is not None:
            if len(reverse_cells) != len(cells):
                raise ValueError("reverse_cells must hold one cell per layer")
            self.cells_reverse = nn.ModuleList(reverse_cells)
        self.bidirectional = reverse_cells is not None
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.input_size = cells[0].input_size
        self.hidden_size = cells[0].hidden_size
        self.num_layers = len(cells)
        self.proj_size = 0  # nn.LSTM's attribute; projections are not offered (see the subclasses)
        self.pair_state = False  # True: return nn.LSTM's (h, c) form even when hx is None

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def extra_repr(self) -> str:
        s = (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
             f"batch_first={self.batch_first}, dropout={self.dropout}")
        return s + (", bidirectional=True" if self.bidirectional else "")

    def reset_parameters(self) -> None:
        """Re-initialise every cell (both directions), as nn.LSTM.reset_parameters() does."""
        for cell in [*self.cells, *getattr(self, "cells_reverse", [])]:
            cell.reset_parameters()

    def cuda_graphed(self, sample_input, hx=None, num_warmup_iters: int = 3) -> "CUDAGraphed":
        """This layer with its forward and backward captured as CUDA graphs for inputs shaped like
        ``sample_input`` (opt-in; see ``CUDAGraphed``). Off CUDA the wrapper calls the layer itself."""
        return CUDAGraphed(self, sample_input, hx, num_warmup_iters)

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM (which calls it after loading or moving a
        model so that cuDNN sees one contiguous weight buffer). These layers never hand their
        weights to cuDNN as one buffer, so there is nothing to flatten."""

    def _layer_cells(self, k: int) -> list[nn.Module]:
        return [self.cells[k], self.cells_reverse[k]] if self.bidirectional else [self.cells[k]]

    # ------------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        output, state, _ = self._forward(input, hx, record=False)
        return output, state

    def forward_with_activity(self, input, hx=None):
        """Like ``forward`` but also returns, per layer (and direction, in the state's order
        layer * num_directions + direction), a dict of time-major per-step tensors (for a
        HyperLSTM: ``d_h``, ``d_x``, ``bias`` of shape (T, B, 4, hidden_size), gate order
        i, g, f, o, and ``h_hat`` of shape (T, B, hyper_size)); the reverse direction's are in
        input time order too. Padded steps of a PackedSequence hold the values computed on
        padding; mask them with the lengths."""
        return self._forward(input, hx, record=True)

    # ------------------------------------------------------------------------------------
    def _forward(self, input, hx, record: bool):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            batched = True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError("input must be (seq_len, batch, input_size), (batch, seq_len, input_size) "
                                 f"with batch_first=True, (seq_len, input_size) or a PackedSequence; got {_shape(input)}")
            batched = input.dim() == 3
            x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
            if not batched:
                x = x.unsqueeze(1)
            lengths = None
        if x.size(-1) != self.input_size:
            raise ValueError(f"input has {x.size(-1)} features, expected input_size={self.input_size}")
        if x.size(0) == 0:
            raise ValueError("input has an empty time dimension")
        _check_dtype(self, x)
        B = x.size(1)
        states, form = self._initial_states(hx, B, batched, x)
        if hx is None and self.pair_state and len(self.cells[0].state_sizes) > 2:
            form = PAIR
        mask = reverse_index = None
        if lengths is not None:
            steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
            lens = lengths.to(x.device).unsqueeze(0)
            mask = (steps < lens).unsqueeze(-1)  # (T, B, 1)
            if self.bidirectional:
                reverse_index = torch.where(steps < lens, lens - 1 - steps, steps)  # (T, B)

        activity: list[dict] = []
        finals: list[State] = []
        for k in range(self.num_layers):
            outputs = []
            for d, cell in enumerate(self._layer_cells(k)):
                rec = {} if record else None
                if d == 0:
                    y, final = self._run_layer(cell, x, states[k * self.num_directions], mask, rec)
                else:  # the reverse direction: the same per-direction run over each reversed sequence
                    y, final = self._run_layer(cell, _reverse_time(x, reverse_index), states[2 * k + 1], mask, rec)
                    y = _reverse_time(y, reverse_index)
                outputs.append(y)
                finals.append(final)
                if rec is not None:
                    a = {name: torch.stack(v) for name, v in rec.items()}
                    activity.append(a if d == 0 else {n: _reverse_time(v, reverse_index) for n, v in a.items()})
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0.0 and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        state = tuple(torch.stack(parts) for parts in zip(*finals))
        if packed:
            output = self._repack(x, lengths, input)
        else:
            output = x if batched else x.squeeze(1)
            if batched and self.batch_first:
                output = output.transpose(0, 1)
        if not batched:
            state = tuple(s.squeeze(1) for s in state)
            activity = [{n: v.squeeze(1) for n, v in a.items()} for a in activity]
        return output, _write_state(state, form), activity

    # torch.compile: each layer's run stays eager, an opaque call between the compiled parts of a
    # model (dynamo would otherwise trace into the fused Functions' time loops, whose step
    # kernels and oneDNN calls inductor cannot lower, or unroll the reference loop step by step).
    @_compiler_opaque
    def _run_layer(self, cell, x, state: State, mask, rec):
        if rec is None:
            # A whole-sequence fused path (see _fused.py) when the cell has one for its config;
            # padded batches (PackedSequence input) run it with per-step active batch sizes.
            fused = getattr(cell, "fused_forward", None)
            result = None
            if fused is not None:
                result = fused(x, state) if mask is None else _fused.packed_forward(cell, x, state, mask)
            if result is not None:
                return result
        xw = cell.input_projection(x)
        outputs = []
        for t in range(x.size(0)):
            h, new_state = cell.step(xw[t], state, rec)
            if mask is not None:  # finished sequences keep their last state and output zeros
                m = mask[t]
                new_state = tuple(torch.where(m, n, s) for n, s in zip(new_state, state))
                h = h * m
            state = new_state
            outputs.append(h)
        return torch.stack(outputs), state

    def _initial_states(self, hx, batch: int, batched: bool, ref: torch.Tensor) -> tuple[list[State], str]:
        sizes = self.cells[0].state_sizes
        n = self.num_layers * self.num_directions
        lead = (n, batch) if batched else (n,)
        given, form = _read_state(hx, sizes, lead, getattr(self.cells[0], "tensor_state", False), "", ref)
        full = [ref.new_zeros(n, batch, size) if g is None else (g if batched else g.unsqueeze(1))
                for g, size in zip(given, sizes)]
        return [tuple(z[k] for z in full) for k in range(n)], form

    @staticmethod
    def _repack(padded: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
        # Pack in the input's own sorted order so batch_sizes and data rows line up with it.
        if like.sorted_indices is not None:
            padded = padded.index_select(1, like.sorted_indices)
            lengths = lengths.index_select(0, like.sorted_indices.cpu())
        data = pack_padded_sequence(padded, lengths, enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


# -- opt-in CUDA-graph replay ----------------------------------------------------------------------
class CUDAGraphed(nn.Module):
    """A recurrent layer whose forward and backward replay CUDA graphs captured once for one input
    shape (``torch.cuda.make_graphed_callables``): the time loop's hundreds of kernel launches per
    step go to the GPU as two graph launches. Build it with ``layer.cuda_graphed(sample_input, hx)``.

    ``forward(input, hx=None)`` replays the graphs when the call matches the capture (a CUDA tensor
    of the sample's shape, dtype and device; ``hx`` None if the sample had none, else states of the
    sample's shapes; the same training mode and autocast state) and otherwise calls the layer
    itself, so a last short batch or an evaluation call still runs. ``graphed`` says whether a
    capture exists, ``why_not`` why not (no CUDA tensor, a PackedSequence, a failed capture).

    Constraints of graph replay (PyTorch's): outputs live in the graph's static buffers, so the
    next call overwrites them (clone what must outlive it); each forward is followed by at most one
    backward before the next forward; parameters must stay where they are (an optimizer's in-place
    update is fine, replacing a tensor is not); under autocast, capture and call with
    ``torch.autocast(..., cache_enabled=False)``. Recurrent dropout draws fresh masks per replay
    (PyTorch's graph-safe random generator).
    """

    _capture_devices = ("cuda",)  # tests widen this to run the wrapper's logic with a stand-in capture on CPU

    def __init__(self, module: nn.Module, sample_input, hx=None, num_warmup_iters: int = 3):
        super().__init__()
        self.module = module
        self.graphed = False
        self.why_not: str | None = None
        object.__setattr__(self, "_flat", None)  # not a submodule: no second copy of the layer's keys
        self._key = None
        if isinstance(sample_input, PackedSequence):
            self.why_not = "PackedSequence input (its lengths are read on the host each call): runs the layer itself"
        elif not isinstance(sample_input, torch.Tensor) or sample_input.device.type not in self._capture_devices:
            where = sample_input.device if isinstance(sample_input, torch.Tensor) else type(sample_input).__name__
            self.why_not = f"the sample input is not a CUDA tensor ({where}): runs the layer itself"
        elif not torch.cuda.is_available():
            self.why_not = "CUDA is not available: runs the layer itself"
        else:
            try:
                self._capture(sample_input, hx, num_warmup_iters)
                self.graphed = True
            except Exception as e:  # a capture that fails leaves the eager layer in charge
                object.__setattr__(self, "_flat", None)
                self.why_not = f"capture failed ({type(e).__name__}: {str(e)[:300]}): runs the layer itself"

    @staticmethod
    def _state_list(hx):
        if hx is None:
            return []
        return [hx] if isinstance(hx, torch.Tensor) else list(hx)

    def _call_key(self, input, hx):
        """What a call must share with the capture for the graphs to replay it."""
        state = self._state_list(hx)
        dev = input.device.type
        try:
            amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        except (TypeError, RuntimeError):
            amp = None
        form = "none" if hx is None else "tensor" if isinstance(hx, torch.Tensor) else f"tuple{len(state)}"
        return (tuple(input.shape), input.dtype, input.device, input.requires_grad, form,
                tuple((tuple(s.shape), s.dtype, s.device, s.requires_grad) for s in state), self.module.training, amp)

    def _capture(self, x, hx, warmup: int) -> None:
        layer, state = self.module, self._state_list(hx)
        tensor_hx = isinstance(hx, torch.Tensor)
        has_hx = hx is not None

        class _Flat(nn.Module):  # tensors in, tensors out, as make_graphed_callables wants
            def __init__(self):
                super().__init__()
                self.layer = layer

            def forward(self, input, *st):
                h = (st[0] if tensor_hx else tuple(st)) if has_hx else None
                out, new = self.layer(input, h)
                return (out, new) if isinstance(new, torch.Tensor) else (out, *new)

        flat = _Flat()
        graphed = torch.cuda.make_graphed_callables(flat, (x, *state), num_warmup_iters=warmup,
                                                    allow_unused_input=True)
        object.__setattr__(self, "_flat", graphed)
        self._key = self._call_key(x, hx)

    def forward(self, input, hx=None):
        if not self.graphed or not isinstance(input, torch.Tensor) or self._call_key(input, hx) != self._key:
            return self.module(input, hx)
        outs = self._flat(input, *self._state_list(hx))
        out, state = outs[0], tuple(outs[1:])
        return out, (state[0] if len(state) == 1 and isinstance(hx, torch.Tensor) else state)


def cuda_graphed(module: nn.Module, sample_input, hx=None, num_warmup_iters: int = 3) -> CUDAGraphed:
    """``CUDAGraphed(module, sample_input, hx)``: see there (opt-in; on CPU the layer itself runs)."""
    return CUDAGraphed(module, sample_input, hx, num_warmup_iters)
