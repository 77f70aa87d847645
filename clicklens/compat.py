"""How this project's pinned stack has to be imported, in one place.

Every clicklens package imports this module before TensorFlow.  It knows two
facts about the TF 2.20 line (docs/ARCHITECTURE.md, "The pinned stack"):

1. tensorflow-recommenders and neural-structured-learning are written for
   Keras 2, so `tf.keras` must be the legacy `tf_keras` package.  TensorFlow
   reads TF_USE_LEGACY_KERAS when `tf.keras` is first resolved, so it has to be
   set before that happens.
2. neural-structured-learning 1.4.0 imports `tensorflow.estimator` when the
   package is imported (for its Estimator helpers, which clicklens does not
   use); TensorFlow >= 2.16 no longer ships it.  An empty stand-in module makes
   `import neural_structured_learning` work; calling the NSL Estimator helpers
   would still fail, which is the honest outcome.

No other module may repeat either fact.  It also keeps TensorFlow's C++
start-up chatter out of the progress output (see `_quiet_tensorflow_cpp_logs`).
"""

import os
import sys
import types

os.environ["TF_USE_LEGACY_KERAS"] = "1"

_ACCELERATOR_DEVICE_NODES = ("/dev/nvidia*", "/dev/accel*", "/dev/vfio/[0-9]*")


def _quiet_tensorflow_cpp_logs() -> None:
    """Hides TensorFlow's C++ start-up chatter unless the user asked for a log level.

    INFO and WARNING lines (CPU feature notices, oneDNN) are always hidden.  On
    a machine with no GPU or TPU device node, ERROR lines are hidden too: the
    only one TensorFlow prints there is "failed call to cuInit", because the
    CUDA-enabled wheel probes for a GPU that cannot exist.  Real failures still
    surface as Python exceptions; `TF_CPP_MIN_LOG_LEVEL=0` shows everything.
    """
    import glob

    has_accelerator = any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICE_NODES)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_accelerator else "3")


_ESTIMATOR = "tensorflow.estimator"


def _register_missing_estimator() -> None:
    """Registers an empty `tensorflow.estimator` when TensorFlow lacks one."""
    import importlib.util

    # TF <= 2.15 served tensorflow.estimator from the tensorflow_estimator
    # package; asking for that top-level name does not import TensorFlow.
    if _ESTIMATOR in sys.modules or importlib.util.find_spec("tensorflow_estimator") is not None:
        return
    stub = types.ModuleType(_ESTIMATOR, "Stand-in registered by clicklens.compat: TF >= 2.16 has no estimator.")
    sys.modules[_ESTIMATOR] = stub


def _check_keras_not_resolved_yet() -> None:
    """Fails loudly if Keras 3 was already bound to tf.keras before this module ran."""
    tf = sys.modules.get("tensorflow")
    keras = getattr(tf, "keras", None) if tf is not None and "keras" in vars(tf) else None
    if keras is not None and not keras.__name__.startswith("tf_keras"):
        raise ImportError(
            "tf.keras was resolved to Keras 3 before clicklens set TF_USE_LEGACY_KERAS=1; "
            "import clicklens before using tf.keras."
        )


_quiet_tensorflow_cpp_logs()
_register_missing_estimator()
_check_keras_not_resolved_yet()
