"""Datasets (torchvision-style: root, download, transform) and LightningDataModules."""
