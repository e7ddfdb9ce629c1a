"""Character-level language modelling task (LightningModule).

Trains a :class:`~hypernetworks.models.char_lm.CharLM` on the stream batches of
:mod:`hypernetworks.data.text`: the recurrent state is carried, detached, from one window to the
next within an epoch (truncated BPTT) and reset when a batch's window index is 0. Validation and
test carry the state through the whole split and report bits per character over all of it
(``val_bpc`` / ``test_bpc``: summed negative log-likelihood over every predicted symbol / count / ln 2).

The vocabulary is taken from the data module at the start of fitting (or given as ``vocab``) and
saved in the hyperparameters, so ``hypernetworks.training.load_task`` rebuilds the model alone.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import Metric

from hypernetworks.data.text import IGNORE_INDEX
from hypernetworks.models.char_lm import CharLM


def detach_state(state):
    """Recursive detach over the (nested) tuples a recurrent layer returns."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def _flatten_state(state) -> list[torch.Tensor]:
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in _flatten_state(s)]


class BitsPerCharacter(Metric):
    """Summed NLL (nats) and symbol count over a whole split, reduced across processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: torch.Tensor | int) -> None:
        # out of place: states may be inference tensors left by an earlier trainer.validate()
        self.nll = self.nll + nll_sum.detach().to(torch.float64)
        self.count = self.count + int(count)

    def compute(self) -> torch.Tensor:
        return (self.nll / self.count.clamp(min=1) / math.log(2)).to(torch.float32)


class LanguageModelTask(LightningModule):
    """Char LM training, bpc evaluation, sampling and the demo page's ``demo_generate``."""

    monitor = "val_bpc"
    monitor_mode = "min"

    def __init__(self, cell: str = "lstm", hidden_size: int = 256, num_layers: int = 1, hyper_size: int = 128,
                 embedding_size: int = 4, embedding_dim: int | None = None, input_dropout: float = 0.0,
                 output_dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 layer_dropout: float | None = None, hyper_recurrent_dropout: float | None = None,
                 z_input: str = "current", layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                 input_init: str | None = None, lr: float = 1e-3, weight_decay: float = 0.0, lr_plateau_factor: float | None = None,
                 lr_plateau_patience: int = 0, lr_plateau_threshold: float = 0.0, lr_min: float = 0.0,
                 vocab: list[str] | None = None) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr!r}")
        if lr_plateau_factor is not None and not 0 < lr_plateau_factor < 1:
            raise ValueError(f"lr_plateau_factor must be in (0, 1) or None; got {lr_plateau_factor!r}")
        if not 0 <= lr_min <= lr:
            raise ValueError(f"lr_min must be in [0, lr]; got {lr_min!r} with lr {lr!r}")
        if lr_plateau_patience < 0 or lr_plateau_threshold < 0:
            raise ValueError("lr_plateau_patience and lr_plateau_threshold must be >= 0; got "
                             f"{lr_plateau_patience!r}, {lr_plateau_threshold!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
        if hidden_size <= 0 or num_layers <= 0:
            raise ValueError(f"hidden_size and num_layers must be positive; got {hidden_size}, {num_layers}")
        self.save_hyperparameters()
        self.net: CharLM | None = None
        self._train_state = None
        self._next_train_window = 0
        self._eval_state = None
        self._pending_rng = None
        self._plateau = None  # ReduceLROnPlateau on val_bpc, stepped after each full validation
        self._pending_plateau_state = None
        self.val_bpc = BitsPerCharacter()
        self.test_bpc = BitsPerCharacter()
        if vocab is not None:
            self._build(list(vocab))

    # ------------------------------------------------------------------ model
    def _model_kwargs(self) -> dict:
        h = self.hparams
        return dict(cell=h.cell, hidden_size=h.hidden_size, num_layers=h.num_layers, hyper_size=h.hyper_size,
                    embedding_size=h.embedding_size, embedding_dim=h.embedding_dim, input_dropout=h.input_dropout,
                    output_dropout=h.output_dropout, recurrent_dropout=h.recurrent_dropout,
                    layer_dropout=h.layer_dropout, hyper_recurrent_dropout=h.hyper_recurrent_dropout,
                    # the cells' switches; .get: checkpoints saved before they existed hold the defaults
                    z_input=h.get("z_input", "current"), layer_norm_eps=h.get("layer_norm_eps", 1e-5),
                    layer_norm_bias=h.get("layer_norm_bias", True), input_init=h.get("input_init"))

    def _build(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.stoi = {s: i for i, s in enumerate(vocab)}
        self.hparams["vocab"] = vocab
        self.net = CharLM(len(vocab), **self._model_kwargs())

    def configure_model(self) -> None:
        # the vocabulary comes from the training split, known only once the data module is set up
        if self.net is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "vocab"):
            raise ValueError("LanguageModelTask needs vocab=[...] or a data module with a .vocab")
        self._build(list(dm.vocab.symbols))

    def forward(self, x, state=None):
        return self.net(x, state)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.get("lr_plateau_factor"):
            # Stepped by hand in on_validation_epoch_end: validation runs every val_check_interval
            # steps (not per epoch), and the rate must drop right after the validation that shows
            # the plateau, not one interval later.
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=self.hparams.lr_plateau_factor,
                patience=self.hparams.lr_plateau_patience, threshold=self.hparams.lr_plateau_threshold,
                threshold_mode="abs", min_lr=self.hparams.get("lr_min", 0.0))
            if self._pending_plateau_state is not None:
                self._plateau.load_state_dict(self._pending_plateau_state)
                self._pending_plateau_state = None
        return opt

    def on_validation_epoch_end(self) -> None:
        if self._plateau is None or self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get("val_bpc")
        if value is not None and torch.isfinite(value):
            self._plateau.step(float(value))
        self.log("lr", self._plateau.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _nll(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        return nll, (y != IGNORE_INDEX).sum()

    def training_step(self, batch, batch_idx):
        x, y, window = batch
        window = int(window)
        if window == 0:
            self._train_state = None
        elif window != self._next_train_window:
            warnings.warn(f"training window {window} follows {self._next_train_window - 1}: state reset", stacklevel=2)
            self._train_state = None
        logits, state = self.net(x, self._train_state)
        self._train_state = detach_state(state)
        self._next_train_window = window + 1
        nll, count = self._nll(logits, y)
        loss = nll / count.clamp(min=1)
        self.log("train_loss", loss, prog_bar=False)
        self.log("train_bpc", loss / math.log(2), prog_bar=True)
        return loss

    def _eval_step(self, batch, metric: BitsPerCharacter, name: str):
        x, y, window = batch
        if int(window) == 0:
            self._eval_state = None
        logits, state = self.net(x, self._eval_state)
        self._eval_state = detach_state(state)
        nll, count = self._nll(logits, y)
        metric.update(nll, count)
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_bpc, "val_bpc")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_bpc, "test_bpc")

    def on_validation_epoch_start(self) -> None:
        self._eval_state = None

    on_test_epoch_start = on_validation_epoch_start

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the carried state and the RNG (dropout masks) make a resumed run equal an uninterrupted one
        checkpoint["char_lm"] = {
            "train_state": _flatten_state(self._train_state),
            "next_train_window": self._next_train_window,
            "torch_rng": torch.get_rng_state(),
            "lr_plateau": self._plateau.state_dict() if self._plateau is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.net is None and self.hparams.get("vocab"):
            self._build(list(self.hparams["vocab"]))
        extra = checkpoint.get("char_lm")
        if not extra:
            return
        self._pending_rng = extra.get("torch_rng")
        self._pending_plateau_state = extra.get("lr_plateau")
        flat = extra.get("train_state") or []
        self._train_state = self._unflatten(flat) if flat else None
        self._next_train_window = int(extra.get("next_train_window", 0))

    def _unflatten(self, flat: list[torch.Tensor]):
        # single layer stack states are tuples of tensors (h, c[, h_hat, c_hat])
        return tuple(t.to(self.device) for t in flat)

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng.cpu())
            self._pending_rng = None
        if self._train_state is not None:
            self._train_state = tuple(t.to(self.device) for t in self._train_state)

    # ------------------------------------------------------------------ generation
    def encode(self, text: str) -> torch.Tensor:
        unk = self.stoi.get("\ufffd")
        ids = []
        for ch in text:
            i = self.stoi.get(ch, unk)
            if i is None:
                raise ValueError(f"prime contains {ch!r}, which is not in the model's vocabulary")
            ids.append(i)
        return torch.tensor(ids, dtype=torch.long)

    def _steps(self, length: int, temperature: float, seed: int, prime: str, activity: bool):
        """Sample one character per step, lazily: yields ``(id, d_h of this call (T, 4, H) or None)``.

        The arguments are checked before the first step (not on first ``next``) so callers get the
        error at once; the model is in eval mode while the generator runs.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        if self.net is None:
            raise ValueError("the model has no vocabulary yet (train it or pass vocab=[...])")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        prime_ids = self.encode(prime) if prime else torch.randint(len(self.vocab), (1,), generator=gen)
        return self._step_loop(length, temperature, gen, prime_ids, activity)

    def _step_loop(self, length, temperature, gen, prime_ids, activity):
        was_training = self.training
        self.eval()
        device = self.device
        state = None
        x = prime_ids.view(1, -1).to(device)
        try:
            for _ in range(length):
                with torch.no_grad():
                    if activity:
                        logits, state, act = self.net.forward_with_activity(x, state)
                        d_h = act[-1].get("d_h") if act and isinstance(act[-1], dict) else None
                        d_h = d_h[:, 0] if d_h is not None else None  # (T, 4, H) of this call
                    else:
                        logits, state = self.net(x, state)
                        d_h = None
                    probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                yield nxt, d_h
                x = torch.tensor([[nxt]], device=device)
        finally:
            if was_training:
                self.train()

    def _generate(self, length: int, temperature: float, seed: int, prime: str, activity: bool):
        out, d_hs = [], []
        for nxt, d_h in self._steps(length, temperature, seed, prime, activity):
            out.append(nxt)
            d_hs.append(d_h)
        return out, (d_hs if activity else [])

    def sample(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = "") -> str:
        """``length`` sampled characters following ``prime`` (deterministic under ``seed``)."""
        out, _ = self._generate(length, temperature, seed, prime, activity=False)
        return "".join(self.vocab[i] for i in out)

    demo_kind = "text"

    def demo_stream(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = ""):
        """The demo page's streaming contract: an iterator of ``(character, [i, g, f, o])``, one
        model step per item, computed as it is consumed. The intensity is the gate change of the
        last layer's d_h (all zeros for a model that is not a HyperLSTM); arguments are checked at
        the call, before any step."""
        steps = self._steps(length, temperature, seed, prime, activity=True)
        return self._demo_items(steps)

    def _demo_items(self, steps):
        from hypernetworks.nn import gate_change_intensity

        previous = None
        for t, (nxt, d_h) in enumerate(steps):
            if d_h is None:
                yield self.vocab[nxt], [0.0] * 4
                continue
            # Step t's character was sampled from the state made with d_h of the last input of
            # call t; the first is compared with the prime's second-to-last d_h when there is one.
            if t == 0 and d_h.shape[0] > 1:
                previous = d_h[-2]
            current = d_h[-1]
            yield self.vocab[nxt], gate_change_intensity(current[None], previous)[0].float().cpu().tolist()
            previous = current

    def demo_generate(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = "") -> dict:
        """The demo-page contract in one piece: ``demo_stream`` collected into
        ``{"kind": "text", "steps": [...], "intensity": [[i, g, f, o], ...]}``."""
        items = list(self.demo_stream(length, temperature, seed, prime))
        return {"kind": "text", "steps": [c for c, _ in items], "intensity": [i for _, i in items]}

    @torch.no_grad()
    def activity_of(self, text: str) -> tuple[list[str], list[list[float]]]:
        """Gate change intensity of the last layer while reading ``text`` (teacher forcing):
        (characters, intensity per character)."""
        from hypernetworks.nn import gate_change_intensity

        self.eval()
        ids = self.encode(text).view(1, -1).to(self.device)
        _, _, act = self.net.forward_with_activity(ids)
        d_h = act[-1].get("d_h") if act and isinstance(act[-1], dict) else None
        chars = list(text)
        if d_h is None:
            return chars, [[0.0] * 4 for _ in chars]
        return chars, gate_change_intensity(d_h[:, 0]).float().cpu().tolist()
