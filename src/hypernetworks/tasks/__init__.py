"""One LightningModule per kind of task: loss, metrics, logging; nothing model-specific."""
