"""The tf.Modules that become clicklens' SavedModels, and their serving signatures.

Every signature takes what a user has: raw query strings (tokenized in the
graph by trainer.preprocess.QueryTokenizer) or raw encoded image bytes
(decoded and resized in the graph), so a TF Serving client sends text or a
file, never token ids or pixels (shared/DESIGN.md).

    query_encoder         serving_default(query)        -> embedding
                          hash_code(query)              -> hash_code
    image_encoder         serving_default(image_bytes)  -> embedding
                          hash_code(image_bytes)        -> hash_code
    retrieval_scann,      serving_default(query)        -> image_ids, scores
    retrieval_bruteforce  by_image(image_bytes)         -> image_ids, scores

With image_source=features the image input is `image_features` (float
[batch, feature_dim]) instead of `image_bytes`.

Binary codes (the Sogou relevance design): bit i of an embedding's code is 1
when component i is > 0; `hash_code` packs the bits 8 to a byte, most
significant bit first, into one string per row.  The Hamming distance of two
codes equals (dim - <s(a), s(b)>) / 2 with s(x) = +1 / -1 per bit, which is
how the Hamming brute-force index computes it (a matmul).
"""

from __future__ import annotations

from typing import Dict

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from trainer import preprocess

QUERY = "query"
IMAGE_BYTES = "image_bytes"
IMAGE_FEATURES = "image_features"
EMBEDDING = "embedding"
HASH_CODE = "hash_code"
IMAGE_IDS = "image_ids"
SCORES = "scores"
TEXT_SIGNATURE = "serving_default"
IMAGE_SIGNATURE = "by_image"
HASH_SIGNATURE = "hash_code"

_BYTE_STRINGS = [bytes([i]) for i in range(256)]


def sign_bits(embeddings: tf.Tensor) -> tf.Tensor:
    """float [B, D] -> int32 [B, D] with 1 where the component is > 0."""
    return tf.cast(embeddings > 0.0, tf.int32)


def signed_code(embeddings: tf.Tensor) -> tf.Tensor:
    """float [B, D] -> float [B, D] of +1 / -1: the binary code as a vector."""
    return tf.cast(2 * sign_bits(embeddings) - 1, tf.float32)


def pack_codes(embeddings: tf.Tensor) -> tf.Tensor:
    """float [B, D] -> string [B] of ceil(D/8) bytes: sign bits, MSB first, zero-padded."""
    bits = sign_bits(embeddings)
    dim = embeddings.shape[-1]
    pad = -dim % 8
    if pad:
        bits = tf.pad(bits, [[0, 0], [0, pad]])
    groups = tf.reshape(bits, [-1, (dim + pad) // 8, 8])
    byte_values = tf.reduce_sum(groups * tf.constant([128, 64, 32, 16, 8, 4, 2, 1], tf.int32), axis=-1)
    return tf.strings.reduce_join(tf.gather(tf.constant(_BYTE_STRINGS), byte_values), axis=-1)


class Encoders(tf.Module):
    """Raw input -> embedding for both towers; shared by every exported module."""

    def __init__(self, tokenizer: preprocess.QueryTokenizer, query_tower: tf.keras.Model,
                 image_tower: tf.keras.Model, image_source: str, image_size: int, feature_dim: int = 0):
        super().__init__(name="encoders")
        self.tokenizer = tokenizer
        self.query_tower = query_tower
        self.image_tower = image_tower
        self.image_source = image_source
        self.image_size = image_size
        self.feature_dim = feature_dim

    @property
    def image_input(self) -> str:
        return IMAGE_BYTES if self.image_source == "pixels" else IMAGE_FEATURES

    def image_spec(self) -> tf.TensorSpec:
        if self.image_source == "pixels":
            return tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)
        return tf.TensorSpec([None, self.feature_dim], tf.float32, name=IMAGE_FEATURES)

    def embed_queries(self, queries: tf.Tensor) -> tf.Tensor:
        return self.query_tower(self.tokenizer(queries), training=False)

    def embed_images(self, images: tf.Tensor) -> tf.Tensor:
        if self.image_source == "pixels":
            images = preprocess.decode_images(images, self.image_size)
        return self.image_tower(images, training=False)


QUERY_SPEC = tf.TensorSpec([None], tf.string, name=QUERY)


class QueryEncoder(tf.Module):
    """query_encoder: raw query strings -> embedding / hash_code."""

    def __init__(self, encoders: Encoders):
        super().__init__(name="query_encoder")
        self.encoders = encoders

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def embed(query):
            return {EMBEDDING: self.encoders.embed_queries(query)}

        def code(query):
            return {HASH_CODE: pack_codes(self.encoders.embed_queries(query))}

        return {TEXT_SIGNATURE: tf.function(embed).get_concrete_function(QUERY_SPEC),
                HASH_SIGNATURE: tf.function(code).get_concrete_function(QUERY_SPEC)}


class ImageEncoder(tf.Module):
    """image_encoder: raw image bytes (or feature vectors) -> embedding / hash_code."""

    def __init__(self, encoders: Encoders):
        super().__init__(name="image_encoder")
        self.encoders = encoders

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def embed(images):
            return {EMBEDDING: self.encoders.embed_images(images)}

        def code(images):
            return {HASH_CODE: pack_codes(self.encoders.embed_images(images))}

        spec = self.encoders.image_spec()  # named image_bytes / image_features: the signature's input name
        return {TEXT_SIGNATURE: tf.function(embed).get_concrete_function(spec),
                HASH_SIGNATURE: tf.function(code).get_concrete_function(spec)}


class Retrieval(tf.Module):
    """retrieval_*: a query (text or image) -> the top-k corpus image ids and their scores.

    `top_k` is an indexed tfrs.layers.factorized_top_k layer (ScaNN or
    BruteForce).  With `binary=True` the layer is indexed over +1/-1 codes and
    queries are binarized the same way; scores are then the number of equal
    bits (dim - Hamming distance).
    """

    def __init__(self, encoders: Encoders, top_k, k: int, binary: bool = False, name: str = "retrieval"):
        super().__init__(name=name)
        self.encoders = encoders
        self.top_k = top_k
        self.k = k
        self.binary = binary

    def search_embeddings(self, embeddings: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Top-k for query embeddings (also used to measure recall without the encoders)."""
        if self.binary:
            embeddings = signed_code(embeddings)
        scores, ids = self.top_k(embeddings, k=self.k)
        if self.binary:
            scores = (scores + float(embeddings.shape[-1])) / 2.0
        return {IMAGE_IDS: ids, SCORES: scores}

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def by_text(query):
            return self.search_embeddings(self.encoders.embed_queries(query))

        def by_image(images):
            return self.search_embeddings(self.encoders.embed_images(images))

        return {TEXT_SIGNATURE: tf.function(by_text).get_concrete_function(QUERY_SPEC),
                IMAGE_SIGNATURE: tf.function(by_image).get_concrete_function(self.encoders.image_spec())}
