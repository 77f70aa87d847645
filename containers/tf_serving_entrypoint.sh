#!/bin/bash
# The stock tensorflow/serving image's entrypoint, running clicklens-model-server instead of
# tensorflow_model_server: the same default flags, and `docker run IMAGE --flag=...` adds flags.
exec clicklens-model-server --port=8500 --rest_api_port=8501 \
  --model_name="${MODEL_NAME}" --model_base_path="${MODEL_BASE_PATH}/${MODEL_NAME}" "$@"
