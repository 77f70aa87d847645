"""clicklens serving: TF Serving's gRPC/REST APIs over the exported SavedModels, client, search page, tools.

Imports the clicklens core (first, which sets up the pinned TensorFlow stack)
and libraries, never the other stages.
"""

import clicklens  # noqa: F401
