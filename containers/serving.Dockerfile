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
