#!/usr/bin/env bash
# Creates a Vertex AI custom job and waits for it to end; exits 0 only if it succeeded.
#
#   bash containers/vertex_job.sh --region=R --display-name=N --worker-pool-spec=... \
#     --command=python,-m,trainer.task --args=--config=configs/tpu.yaml,--workdir=gs://B/W
#
# Every argument goes unchanged to `gcloud ai custom-jobs create` (cloudbuild.yaml's
# train step); this script only adds the waiting, so the next step (export) starts
# from a finished model.
set -euo pipefail

poll_seconds="${VERTEX_POLL_SECONDS:-60}"
job="$(gcloud ai custom-jobs create "$@" --format='value(name)')"
region="${job#*/locations/}"
region="${region%%/*}"
job_id="${job##*/}"
echo "created ${job}"
echo "logs: https://console.cloud.google.com/vertex-ai/locations/${region}/training/${job_id}"

while true; do
  state="$(gcloud ai custom-jobs describe "${job_id}" --region="${region}" --format='value(state)')"
  case "${state}" in
    JOB_STATE_SUCCEEDED)
      echo "${job}: ${state}"
      exit 0 ;;
    JOB_STATE_FAILED | JOB_STATE_CANCELLED | JOB_STATE_EXPIRED)
      echo "${job}: ${state}" >&2
      gcloud ai custom-jobs describe "${job_id}" --region="${region}" --format='value(error.message)' >&2
      exit 1 ;;
  esac
  sleep "${poll_seconds}"
done
