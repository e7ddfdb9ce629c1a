"""TranslationTask: BLEU, a tiny real training run, the checkpoint carrying its tokenizer, and
``hypernetworks translate``."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from hypernetworks.data.parallel import TranslationDataModule
from hypernetworks.tasks.translation import TOKENIZER_KEY, TranslationTask, corpus_bleu
from hypernetworks.training import TaskClassPath, load_task
from tests.conftest import require_file

TINY = dict(embed_size=16, hidden_size=32, hyper_size=8, hyper_embedding_size=4, dropout=0.0)


def test_bleu_of_reference_against_itself_is_100():
    refs = ["Un homme fait du vélo dans la rue.", "Deux chiens jouent dans la neige !", "Une fille lit un livre."]
    r = corpus_bleu(refs, refs)
    assert r["score"] == pytest.approx(100.0)
    assert "nrefs:1" in r["signature"] and "tok:13a" in r["signature"] and "version:" in r["signature"]
    assert corpus_bleu(["Un chat dort.", "Deux chiens dorment.", "Rien."], refs)["score"] < 30
    with pytest.raises(ValueError):
        corpus_bleu(refs[:2], refs)


def test_tiny_training_lowers_validation_loss_and_checkpoint_translates(tmp_path, shared_data, monkeypatch, capsys):
    root = shared_data / "multi30k_en_fr"
    require_file(root / "train.en.gz")
    seed_everything(0)
    dm = TranslationDataModule(dataset="multi30k", root=str(root), vocab_size=300, max_train_pairs=400,
                               batch_size=50, max_len=30, cache_dir=str(tmp_path / "spm"))
    task = TranslationTask(model="multi30k-gnmt-hyperlstm", model_args=TINY, lr=1e-2, label_smoothing=0.1,
                           beam_size=2)
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    before = Trainer(**kw).validate(task, datamodule=dm, verbose=False)[0]["val_loss"]
    assert task.hparams.model_vocab_size == dm.tokenizer.vocab_size == 300
    trainer = Trainer(max_steps=40, gradient_clip_val=1.0, callbacks=[TaskClassPath()], **kw)
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val_loss"]
    assert after < before - 0.5, (before, after)

    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw[TOKENIZER_KEY].dtype == torch.uint8  # the SentencePiece model travels with the weights
    loaded = load_task(ckpt)
    assert loaded.tokenizer.model_bytes == dm.tokenizer.model_bytes
    for a, b in zip(loaded.state_dict().values(), task.state_dict().values()):
        assert torch.equal(a, b.cpu())
    src = ["A man is riding a bike.", "", "Two dogs play in the snow."]
    task.eval()
    out = loaded.translate(src, beam=2)
    assert out == task.translate(src, beam=2) and out[1] == "" and out[0]

    from hypernetworks.commands import translate

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(src) + "\n"))
    assert translate.main(["--checkpoint", str(ckpt), "--beam", "2"]) == 0
    assert capsys.readouterr().out.split("\n")[:3] == out
    assert translate.main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
