"""clicklens trainer: the two-tower model, its training and evaluation, and the export for TF Serving.

Imports the clicklens core (first, which sets up the pinned TensorFlow stack)
and libraries, never the other stages.
"""

import clicklens  # noqa: F401
