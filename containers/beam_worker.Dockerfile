# syntax=docker/dockerfile:1
# The Dataflow worker image (custom container) and the pipeline launcher.
# Based on Beam's own SDK image at the version requirements.txt pins, with the
# same stack and the clicklens core + pipeline installed, so the launcher that submits the job and
# the workers that run it agree on every package:
#
#   docker build -f containers/beam_worker.Dockerfile -t IMAGE .
#   clicklens pipeline ... --runner DataflowRunner --sdk_container_image IMAGE --sdk_location container
#
# BEAM_VERSION must equal the apache-beam version in requirements.txt
# (tests/test_cloud.py checks it).
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/clicklens

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The pipeline stage and the core it imports (tests/test_import_contract.py keeps it that way).
COPY setup.py README.md requirements-test.txt ./
COPY clicklens/ clicklens/
COPY beam_pipelines/ beam_pipelines/
COPY configs/ configs/
RUN pip install --no-cache-dir --no-deps .

# The base image's ENTRYPOINT (/opt/apache/beam/boot) stays: Dataflow starts the
# SDK harness through it.  Cloud Build overrides it with `clicklens` to launch.
