"""clicklens serving: TF Serving's gRPC/REST APIs over the exported SavedModels, client, search page."""

from trainer import compat  # noqa: F401  (sets up TensorFlow before anything imports it)
