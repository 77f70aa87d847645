"""The servables contract: what `clicklens export` writes and every client of it relies on.

    W/export/<model name>/<version>/saved_model.pb         one folder per integer version
    W/export/<model name>/<version>/assets.extra/tf_serving_warmup_requests
    W/export/{query,image}_encoder/<version>/assets.extra/vocab.txt   the query tower's vocabulary

    model                 signature          input           outputs
    query_encoder         serving_default    query           embedding
                          hash_code          query           hash_code
    image_encoder         serving_default    image_bytes     embedding
                          hash_code          image_bytes     hash_code
    retrieval_scann,      serving_default    query           image_ids, scores
    retrieval_bruteforce  by_image           image_bytes     image_ids, scores

Inputs are what a user has: raw query text (tf.string [batch]) and raw encoded
image bytes (tf.string [batch]); with `pipeline.image_source: features` the
image input is `image_features` (float32 [batch, feature_dim]).  Tokenizing and
image preparation happen inside the graph, so a TF Serving client sends text
or a file, never token ids or pixels.

The exporter, the server, the client, the tools, the demo and the search page
(through the server's /clicklens/page.json) take every name from here.
"""

from __future__ import annotations

from typing import Dict, Tuple

from clicklens.errors import ClicklensError
from clicklens.workdir import join

# Model names.
QUERY_ENCODER = "query_encoder"
IMAGE_ENCODER = "image_encoder"
RETRIEVAL_SCANN = "retrieval_scann"
RETRIEVAL_BRUTEFORCE = "retrieval_bruteforce"
ENCODER_MODELS = (QUERY_ENCODER, IMAGE_ENCODER)
RETRIEVAL_MODELS = (RETRIEVAL_SCANN, RETRIEVAL_BRUTEFORCE)
MODEL_NAMES = ENCODER_MODELS + RETRIEVAL_MODELS

# Signature names (serving_default is also TF Serving's default when a request names none).
TEXT_SIGNATURE = "serving_default"
IMAGE_SIGNATURE = "by_image"
HASH_SIGNATURE = "hash_code"
DEFAULT_SIGNATURE = TEXT_SIGNATURE

# Input and output keys.
QUERY = "query"
IMAGE_BYTES = "image_bytes"
IMAGE_FEATURES = "image_features"
EMBEDDING = "embedding"
HASH_CODE = "hash_code"
IMAGE_IDS = "image_ids"
SCORES = "scores"

# Files inside a version folder (TF Serving's names).
# retrieval_scann's index is the retrieval module's `top_k` object; its saved `searcher_handle()` returns the
# ScaNN searcher's resource handle, which a server destroys when it retires the version.
INDEX_ATTRIBUTE = "top_k"
SEARCHER_HANDLE_FUNCTION = "searcher_handle"

SAVED_MODEL_PB = "saved_model.pb"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
# The encoders' versions also keep the vocabulary their query tower's token rows belong to, so a later
# training run can warm-start from an export (training.warm_start=W/export/query_encoder).  TF Serving
# ignores assets.extra/ apart from the warmup file.
EXPORT_VOCAB = "assets.extra/vocab.txt"

# A REST request carries an upload base64-encoded (4 bytes per 3) inside a small JSON envelope.
JSON_ENVELOPE_BYTES = 1024


def image_input(image_source: str) -> str:
    """The image input key of the exported signatures for a pipeline.image_source."""
    return IMAGE_BYTES if image_source == "pixels" else IMAGE_FEATURES


def max_upload_bytes(max_request_bytes: int) -> int:
    """The largest image file that fits one REST predict request of `max_request_bytes`."""
    return max(0, (max_request_bytes - JSON_ENVELOPE_BYTES) * 3 // 4)


def version_dirs(base_path: str, complete_only: bool = True) -> Dict[int, str]:
    """{version: folder} of a model's base path: every sub-folder whose name is an integer
    (zero-padded ones too, as TF Serving reads them) and, with `complete_only`, that holds a
    saved_model.pb.  An exporter choosing a new number passes complete_only=False."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(base_path):
        return {}
    found: Dict[int, str] = {}
    for entry in tf.io.gfile.listdir(base_path):
        name = entry.rstrip("/")
        if name.isdigit() and (not complete_only or tf.io.gfile.exists(join(base_path, name, SAVED_MODEL_PB))):
            found.setdefault(int(name), join(base_path, name))
    return dict(sorted(found.items()))


def start_version(base_path: str, version: int) -> Tuple[str, str]:
    """(temporary folder, final folder) for writing version `version` under base_path.

    Versions are written in the temporary folder (created empty here) and
    renamed into place when complete, so a server never sees half a version;
    an existing final folder is refused: versions are never overwritten.
    """
    import tensorflow as tf

    final = join(base_path, str(version))
    if tf.io.gfile.exists(final):
        raise ClicklensError(f"{final} already exists; versions are never overwritten")
    tmp = join(base_path, f".tmp-{version}")
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.io.gfile.makedirs(base_path)
    return tmp, final


def latest_version(base_path: str) -> Tuple[int, str]:
    """(version, folder) of the newest version under base_path; ClicklensError when there is none."""
    versions = version_dirs(base_path)
    if not versions:
        raise ClicklensError(f"no exported version under {base_path} (run `clicklens export` first)")
    version = max(versions)
    return version, versions[version]
