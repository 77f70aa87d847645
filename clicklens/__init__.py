"""clicklens core: the contracts every stage shares, the command line and the demo.

The stages (`beam_pipelines`, `trainer`, `serving`) import this package and
libraries, never each other; this package imports no stage (the command line
names each verb's function as a string and imports it only when the verb runs).

Importing clicklens first imports `clicklens.compat`, which sets up the pinned
TensorFlow stack (legacy tf-keras, NSL on TF 2.20), so it must come before any
TensorFlow import.
"""

from clicklens import compat  # noqa: F401
