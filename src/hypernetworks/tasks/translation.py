"""Translation as a LightningModule: teacher-forced (label-smoothed) cross entropy with padding
ignored, validation loss/perplexity per target token, and test BLEU of beam-search output with
sacrebleu on detokenized text (the standard signature is printed and stored in ``bleu_signature``).

The subword tokenizer travels with the checkpoint (``checkpoint["sentencepiece_model"]``, a
uint8 tensor of the model bytes), so ``hypernetworks translate`` needs no data folder. When
``model_vocab_size`` is not given the model is built in ``configure_model`` from the data module's
tokenizer and the size is recorded in the hyperparameters, so checkpoints rebuild eagerly.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from hypernetworks.data.parallel import PAD_ID, SubwordTokenizer, collate_pairs
from hypernetworks.models.registry import create_model

TOKENIZER_KEY = "sentencepiece_model"


class TranslationTask(LightningModule):
    """Args:
        model: registered model name (``multi30k-gnmt-lstm``, ``wmt14-gnmt-ln-hyperlstm``, ...).
        model_args: overrides for the model factory (e.g. ``{hidden_size: 128}``).
        model_vocab_size: the joint vocabulary; None: taken from the data module's tokenizer and
            recorded here (named apart from the data module's ``vocab_size`` request).
        lr, weight_decay: Adam.
        warmup_steps: linear warm-up; decay_start/decay_every/decay_factor: step decay after
            ``decay_start`` (GNMT-like halving); 0 disables.
        label_smoothing: training loss only; validation reports plain cross entropy.
        beam_size, length_penalty, max_len_a, max_len_b: test decoding (max length a*src+b).
    """

    monitor = "val_loss"
    monitor_mode = "min"

    def __init__(self, model: str = "multi30k-gnmt-lstm", model_args: dict[str, Any] | None = None,
                 model_vocab_size: int | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 0, decay_start: int = 0, decay_every: int = 0, decay_factor: float = 0.5,
                 label_smoothing: float = 0.1, beam_size: int = 5, length_penalty: float = 0.6,
                 max_len_a: float = 1.5, max_len_b: int = 10):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.save_hyperparameters()
        self.net = None
        self.tokenizer: SubwordTokenizer | None = None
        if model_vocab_size is not None:
            self._build(model_vocab_size)
        self._val_stats: torch.Tensor | None = None
        self._test_out: list[tuple[int, str, str]] = []
        self.bleu_signature: str | None = None

    def _build(self, vocab_size: int) -> None:
        self.net = create_model(self.hparams.model, vocab_size=vocab_size, **(self.hparams.model_args or {}))
        self.hparams.model_vocab_size = vocab_size

    # ------------------------------------------------------------------ tokenizer and lazy build
    def configure_model(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.tokenizer is None and dm is not None and getattr(dm, "tokenizer", None) is not None:
            self.tokenizer = dm.tokenizer
        if self.net is None:
            if self.tokenizer is None:
                raise ValueError("model_vocab_size is not set and the data module provides no tokenizer")
            self._build(self.tokenizer.vocab_size)
        elif self.tokenizer is not None and self.tokenizer.vocab_size != self.hparams.model_vocab_size:
            raise ValueError(f"the data's tokenizer has {self.tokenizer.vocab_size} pieces but the model was "
                             f"built for model_vocab_size={self.hparams.model_vocab_size}")

    def _check_tokenizer(self) -> None:
        # A checkpoint's tokenizer replaces the data's after configure_model; both must agree, or
        # the data would be encoded with different pieces than the model was trained on.
        dm = getattr(self.trainer, "datamodule", None)
        dm_tok = getattr(dm, "tokenizer", None)
        if dm_tok is not None and self.tokenizer is not None and dm_tok.model_bytes != self.tokenizer.model_bytes:
            raise ValueError("the data module's SentencePiece model differs from the one stored in the checkpoint "
                             "(different training data or vocab_size?)")

    def on_fit_start(self) -> None:
        self._check_tokenizer()

    def on_test_start(self) -> None:
        self._check_tokenizer()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = torch.frombuffer(bytearray(self.tokenizer.model_bytes), dtype=torch.uint8)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = SubwordTokenizer(bytes(checkpoint[TOKENIZER_KEY].cpu().numpy().tobytes()))
        if self.net is None and checkpoint.get("hyper_parameters", {}).get("model_vocab_size"):
            self._build(checkpoint["hyper_parameters"]["model_vocab_size"])

    # ------------------------------------------------------------------ training
    def forward(self, src, src_lengths, tgt_in):
        return self.net(src, src_lengths, tgt_in)

    def _loss(self, batch, smoothing: float):
        logits = self(batch["src"], batch["src_lengths"], batch["tgt_in"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), ignore_index=PAD_ID,
                               label_smoothing=smoothing)
        return loss, int((batch["tgt_out"] != PAD_ID).sum())

    def training_step(self, batch, batch_idx):
        loss, ntok = self._loss(batch, self.hparams.label_smoothing)
        self.log("train_loss", loss, prog_bar=True, batch_size=ntok)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_stats = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss, ntok = self._loss(batch, 0.0)
        self._val_stats += torch.stack([loss.detach().double() * ntok, loss.new_tensor(ntok, dtype=torch.float64)])

    def on_validation_epoch_end(self) -> None:
        # per target token over the whole set (summed over data-parallel ranks)
        stats = self.trainer.strategy.reduce(self._val_stats, reduce_op="sum")
        loss = (stats[0] / stats[1].clamp(min=1)).float()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", torch.exp(loss), prog_bar=True)

    # ------------------------------------------------------------------ decoding and BLEU
    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_lengths: torch.Tensor, beam: int | None = None) -> list[list[int]]:
        beam = self.hparams.beam_size if beam is None else beam
        max_len = int(self.hparams.max_len_a * int(src_lengths.max()) + self.hparams.max_len_b)
        if beam == 1:
            return self.net.greedy(src, src_lengths, max_len=max_len)
        return self.net.beam_search(src, src_lengths, beam=beam, max_len=max_len,
                                    length_penalty=self.hparams.length_penalty)

    @torch.no_grad()
    def translate(self, sentences: list[str], beam: int | None = None, batch_size: int = 32) -> list[str]:
        """Detokenized translations of raw sentences (empty input lines give empty outputs)."""
        if self.tokenizer is None:
            raise ValueError("this task has no tokenizer (train it with TranslationDataModule or load a checkpoint)")
        was_training = self.training
        self.eval()
        out = [""] * len(sentences)
        todo = [(i, ids) for i, ids in enumerate(self.tokenizer.encode([s.strip() for s in sentences])) if ids]
        todo.sort(key=lambda p: len(p[1]))  # similar lengths together: less padding
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            batch = collate_pairs([{"src": ids, "tgt": [], "src_text": "", "tgt_text": ""} for _, ids in chunk])
            hyps = self.generate(batch["src"].to(self.device), batch["src_lengths"].to(self.device), beam)
            for (i, _), h in zip(chunk, hyps):
                out[i] = self.tokenizer.decode(h)
        self.train(was_training)
        return out

    def test_step(self, batch, batch_idx):
        hyps = self.generate(batch["src"], batch["src_lengths"])
        for i, h, ref in zip(batch["index"].tolist(), hyps, batch["tgt_text"]):
            self._test_out.append((i, self.tokenizer.decode(h), ref))

    def on_test_epoch_end(self) -> None:
        pairs = self._test_out
        self._test_out = []
        if self.trainer.world_size > 1:  # strings cannot be all_gather'ed as tensors
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        pairs = sorted({i: (i, h, r) for i, h, r in pairs}.values())  # de-duplicate padded batches
        result = corpus_bleu([h for _, h, _ in pairs], [r for _, _, r in pairs])
        self.bleu_signature = result["signature"]
        self.test_hypotheses = [h for _, h, _ in pairs]
        if self.trainer.is_global_zero:
            print(f"BLEU = {result['score']:.2f} ({len(pairs)} sentences, beam {self.hparams.beam_size})  "
                  f"sacrebleu signature: {result['signature']}")
        self.log("test_bleu", result["score"], rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        hp = self.hparams

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps > 0 else 1.0
            if hp.decay_every > 0 and step >= hp.decay_start:
                f *= hp.decay_factor ** (1 + (step - hp.decay_start) // hp.decay_every)
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu corpus BLEU on detokenized text (default 13a tokenization) with its signature."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    return {"score": float(score.score), "signature": str(bleu.get_signature()), "text": str(score)}
