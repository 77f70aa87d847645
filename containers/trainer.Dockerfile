# syntax=docker/dockerfile:1
# The clicklens trainer image: Python 3.11, the pinned stack from requirements.txt,
# the clicklens core, the trainer stage and configs/.  Vertex AI runs `python -m trainer.task`; Cloud
# Build runs `clicklens export` in it.  One Dockerfile, three variants:
#
#   docker build -f containers/trainer.Dockerfile --build-arg VARIANT=tpu -t IMAGE .
#
#   VARIANT=cpu  the stack exactly as requirements.txt pins it (tests, export, CPU runs)
#   VARIANT=gpu  + the CUDA/cuDNN wheels of the same TensorFlow (tensorflow[and-cuda]);
#                the host (Vertex AI, a GPU VM) provides the NVIDIA driver
#   VARIANT=tpu  TensorFlow of the same version built for TPU VMs (tensorflow-tpu) and
#                the libtpu it needs, with libtpu.so in /lib where Vertex AI looks for it
#
# The TensorFlow version of the gpu/tpu variants is read from the installed stack,
# so requirements.txt stays the one list of versions.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG LIBTPU_INDEX=https://storage.googleapis.com/libtpu-tf-releases/index.html

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

RUN TF_VERSION="$(python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')" && \
    case "${VARIANT}" in \
      cpu) ;; \
      gpu) pip install --no-cache-dir "tensorflow[and-cuda]==${TF_VERSION}" ;; \
      tpu) pip uninstall -y tensorflow && \
           pip install --no-cache-dir "tensorflow-tpu==${TF_VERSION}" -f "${LIBTPU_INDEX}" && \
           cp "$(python -c 'import libtpu, os; print(os.path.join(os.path.dirname(libtpu.__file__), "libtpu.so"))')" /lib/libtpu.so ;; \
      *) echo "unknown VARIANT=${VARIANT} (use cpu, gpu or tpu)" >&2; exit 2 ;; \
    esac

# The trainer stage and the core it imports (tests/test_import_contract.py keeps it that way);
# setup.py installs whichever of the packages are present.
COPY setup.py README.md requirements-test.txt ./
COPY clicklens/ clicklens/
COPY trainer/ trainer/
COPY configs/ configs/
RUN pip install --no-cache-dir --no-deps .

# Vertex AI passes the command; this default makes `docker run IMAGE --config ...` train.
ENTRYPOINT ["python", "-m", "trainer.task"]
