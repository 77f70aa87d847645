"""clicklens Beam pipelines: query logs -> click statistics, graph, training examples.

This package imports only the clicklens core and libraries, never `trainer` or `serving`.
"""

import clicklens  # noqa: F401  (sets up the pinned TensorFlow stack before anything imports TensorFlow)
