"""Data parallel training on CPU: 2 processes (gloo) read different streams and stay in sync."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback, seed_everything

from hypernetworks.data.text import PydocTextDataModule
from hypernetworks.tasks.language_model import LanguageModelTask
from hypernetworks.training import make_trainer


class RecordReplica(Callback):
    """Each process writes its first batch and its final weights to ``out/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = batch[0].clone()

    def on_train_end(self, trainer, pl_module):
        torch.save({"first": self.first, "world": trainer.world_size,
                    "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                   f"{self.out}/rank{trainer.global_rank}.pt")


def test_two_process_ddp_replicas_agree(tmp_path):
    seed_everything(0)
    dm = PydocTextDataModule(batch_size=4, seq_len=8, eval_batch_size=2)
    task = LanguageModelTask(cell="hyperlstm", hidden_size=8, hyper_size=4, vocab=list(dm.vocab.symbols))
    trainer = make_trainer(tmp_path, LanguageModelTask, callbacks=[RecordReplica(str(tmp_path))],
                           accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3,
                           limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=0,
                           enable_progress_bar=False, enable_model_summary=False, logger=False)
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    trainer.fit(task, datamodule=dm)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["first"].shape == (2, 8)  # each process gets half of the 4 streams ...
    assert not torch.equal(r0["first"], r1["first"])  # ... and a different half
    for k, v in r0["state"].items():
        torch.testing.assert_close(v, r1["state"][k], msg=k)  # gradients were all-reduced
    assert any(not torch.equal(v, initial[k]) for k, v in r0["state"].items())  # and training moved them
