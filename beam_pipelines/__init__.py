"""clicklens Beam pipelines: query logs -> click statistics, graph, training examples."""

from trainer import compat  # noqa: F401  (sets up TensorFlow before anything imports it)
