"""`bitmind-train`: the training loop, datasets and augmentation for every torch detector."""
