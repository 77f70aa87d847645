"""clicklens trainer: typed config, example contract, two-tower model, training, export.

Importing any clicklens package first imports `trainer.compat`, which sets up
the pinned TensorFlow stack (legacy tf-keras, NSL on TF 2.20).
"""

from trainer import compat  # noqa: F401
