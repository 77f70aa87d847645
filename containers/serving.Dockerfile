# syntax=docker/dockerfile:1
# The serving image: one exported clicklens model baked in, served with tensorflow_model_server's
# command line.  One Dockerfile, two variants with the same flags, ports and entrypoint:
#
# VARIANT=stock (default): the stock tensorflow/serving image at the version of
# tensorflow-serving-api in requirements.txt, serving retrieval_bruteforce, which
# uses only TensorFlow ops and the tensorflow-text ops TF Serving links in:
#
#   clicklens export --workdir W    # or: gcloud storage cp -r gs://B/W/export/retrieval_bruteforce build/serving/
#   docker build -f containers/serving.Dockerfile --build-arg MODEL_DIR=build/serving/retrieval_bruteforce -t IMAGE .
#   docker run -p 8500:8500 -p 8501:8501 IMAGE
#
# VARIANT=clicklens: clicklens-model-server (a drop-in tensorflow_model_server with the ScaNN
# ops, serving/model_server_main.py) on Python with the pinned stack, so retrieval_scann is
# served with the stock image's flags:
#
#   docker build -f containers/serving.Dockerfile --build-arg VARIANT=clicklens \
#     --build-arg SERVING_IMAGE=python:3.11-slim-bookworm \
#     --build-arg MODEL_NAME=retrieval_scann --build-arg MODEL_DIR=build/serving/retrieval_scann -t IMAGE .
#   docker run -p 8500:8500 -p 8501:8501 IMAGE [--enable_batching ...]
ARG SERVING_IMAGE=tensorflow/serving:2.20.0
FROM ${SERVING_IMAGE}

ARG VARIANT=stock
ARG MODEL_NAME=retrieval_bruteforce
ARG MODEL_DIR=build/serving/retrieval_bruteforce

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The clicklens variant installs the pinned stack, the core and the serving stage, and puts
# an entrypoint at the stock image's path that runs clicklens-model-server with the stock
# entrypoint's flags; the stock variant leaves the image as it is.
COPY requirements.txt requirements-test.txt setup.py README.md containers/tf_serving_entrypoint.sh /opt/clicklens/
COPY clicklens/ /opt/clicklens/clicklens/
COPY serving/ /opt/clicklens/serving/
COPY configs/ /opt/clicklens/configs/
RUN case "${VARIANT}" in \
      stock) rm -rf /opt/clicklens ;; \
      clicklens) pip install --no-cache-dir -r /opt/clicklens/requirements.txt && \
                 pip install --no-cache-dir --no-deps /opt/clicklens && \
                 install -m 755 /opt/clicklens/tf_serving_entrypoint.sh /usr/bin/tf_serving_entrypoint.sh && \
                 rm -rf /opt/clicklens ;; \
      *) echo "unknown VARIANT=${VARIANT} (use stock or clicklens)" >&2; exit 2 ;; \
    esac

# The entrypoint serves ${MODEL_BASE_PATH}/${MODEL_NAME}, newest numeric version first; gRPC on
# 8500, REST on 8501 (the stock image's entrypoint, and the clicklens one at the same path).
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_BASE_PATH=/models
COPY ${MODEL_DIR}/ /models/${MODEL_NAME}/
EXPOSE 8500 8501
ENTRYPOINT ["/usr/bin/tf_serving_entrypoint.sh"]

# Healthy once the model has an AVAILABLE version: TF Serving's REST model status,
# read with bash's /dev/tcp (the stock image has no curl).  `clicklens serve`
# answers the same route; its /ready and grpc.health.v1 say the same for all
# models at once (README.md, "Health").
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8501 && printf 'GET /v1/models/%s HTTP/1.0\\r\\n\\r\\n' \"$MODEL_NAME\" >&3 && grep -q '\"state\": \"AVAILABLE\"' <&3"]
# grpc.health.v1.Health on 8500 as well (services "", ModelService, PredictionService),
# for gRPC load balancers; arguments given to `docker run` replace this one.
CMD ["--enable_grpc_healthcheck_service=true"]
