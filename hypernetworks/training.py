"""The training entry point shared by every experiment (Lightning CLI).

A recipe is a LightningCLI YAML file:

    seed_everything: 0
    trainer: {max_steps: 1000, ...}
    model: {class_path: hypernetworks.tasks.<module>.<Task>, init_args: {...}}
    data:  {class_path: hypernetworks.data.<module>.<DataModule>, init_args: {...}}

so any LightningModule / LightningDataModule of the package (or the user's) can be trained.
"""
from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def run_cli(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
