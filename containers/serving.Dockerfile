# syntax=docker/dockerfile:1
# TF Serving with one exported clicklens model baked in.
#
# Stock route (default): the stock tensorflow/serving image at the version of
# tensorflow-serving-api in requirements.txt, serving retrieval_bruteforce, which
# uses only TensorFlow ops and the tensorflow-text ops TF Serving links in:
#
#   clicklens export --workdir W    # or: gcloud storage cp -r gs://B/W/export/retrieval_bruteforce build/serving/
#   docker build -f containers/serving.Dockerfile --build-arg MODEL_DIR=build/serving/retrieval_bruteforce -t IMAGE .
#   docker run -p 8500:8500 -p 8501:8501 IMAGE
#
# ScaNN route: retrieval_scann needs a model server linked to the ScaNN ops.  Pass
# such an image as SERVING_IMAGE and the ScaNN export as the model (README.md,
# "Run on Google Cloud", says how that image is built):
#
#   docker build -f containers/serving.Dockerfile --build-arg SERVING_IMAGE=SCANN_SERVING_IMAGE \
#     --build-arg MODEL_NAME=retrieval_scann --build-arg MODEL_DIR=build/serving/retrieval_scann -t IMAGE .
ARG SERVING_IMAGE=tensorflow/serving:2.20.0
FROM ${SERVING_IMAGE}

ARG MODEL_NAME=retrieval_bruteforce
ARG MODEL_DIR=build/serving/retrieval_bruteforce

# The stock image's entrypoint serves /models/${MODEL_NAME}, newest numeric version
# first; gRPC on 8500, REST on 8501.
ENV MODEL_NAME=${MODEL_NAME}
COPY ${MODEL_DIR}/ /models/${MODEL_NAME}/
EXPOSE 8500 8501

# Healthy once the model has an AVAILABLE version: TF Serving's REST model status,
# read with bash's /dev/tcp (the stock image has no curl).  `clicklens serve`
# answers the same route; its /ready and grpc.health.v1 say the same for all
# models at once (README.md, "Health").
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8501 && printf 'GET /v1/models/%s HTTP/1.0\\r\\n\\r\\n' \"$MODEL_NAME\" >&3 && grep -q '\"state\": \"AVAILABLE\"' <&3"]
# grpc.health.v1.Health on 8500 as well (services "", ModelService, PredictionService),
# for gRPC load balancers; arguments given to `docker run` replace this one.
CMD ["--enable_grpc_healthcheck_service=true"]
