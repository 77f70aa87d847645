"""The tf.Modules that become clicklens' SavedModels, and their serving signatures.

Model, signature, input and output names are the servables contract
(`clicklens.servables`).  Every signature takes what a user has: raw query
strings (tokenized in the graph by trainer.tokenizer.QueryTokenizer) or raw
encoded image bytes (prepared in the graph by clicklens.images, the same
function the pipeline ran on the training images).

Binary codes (the Sogou relevance design): bit i of an embedding's code is 1
when component i is > 0; `hash_code` packs the bits 8 to a byte, most
significant bit first, into one string per row.  The Hamming distance of two
codes equals (dim - <s(a), s(b)>) / 2 with s(x) = +1 / -1 per bit, which is
how the Hamming brute-force index computes it (a matmul).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import servables as S
from clicklens.images import MAX_PIXELS, prepare_images
from trainer.tokenizer import QueryTokenizer

_BYTE_STRINGS = [bytes([i]) for i in range(256)]
BRUTE_FORCE_BLOCK_ROWS = 1 << 20  # 400 MB of scores for a batch of 100; one block up to 1M images


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

    def __init__(self, tokenizer: QueryTokenizer, query_tower: tf.keras.Model,
                 image_tower: tf.keras.Model, image_source: str, image_size: int, feature_dim: int = 0,
                 max_image_pixels: int = MAX_PIXELS):
        super().__init__(name="encoders")
        self.tokenizer = tokenizer
        self.query_tower = query_tower
        self.image_tower = image_tower
        self.image_source = image_source
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.max_image_pixels = max_image_pixels

    def image_spec(self) -> tf.TensorSpec:
        """The image input of the signatures: raw bytes, or feature vectors with image_source=features."""
        name = S.image_input(self.image_source)
        if self.image_source == "pixels":
            return tf.TensorSpec([None], tf.string, name=name)
        return tf.TensorSpec([None, self.feature_dim], tf.float32, name=name)

    def embed_queries(self, queries: tf.Tensor) -> tf.Tensor:
        """Raw query strings [B] -> float32 [B, D]."""
        return self.query_tower(self.tokenizer(queries), training=False)

    def embed_images(self, images: tf.Tensor) -> tf.Tensor:
        """Raw image bytes [B] (or feature vectors [B, F]) -> float32 [B, D]."""
        if self.image_source == "pixels":
            images = prepare_images(images, self.image_size, max_pixels=self.max_image_pixels)
        return self.image_tower(images, training=False)


QUERY_SPEC = tf.TensorSpec([None], tf.string, name=S.QUERY)


def traced(function, spec: tf.TensorSpec) -> tf.types.experimental.ConcreteFunction:
    """`function` traced for one input as a signature.  Without AutoGraph: the signatures branch only on
    Python values, and converting their source (and every function they call) took half a second of each
    export and reindex."""
    return tf.function(function, autograph=False).get_concrete_function(spec)


class QueryEncoder(tf.Module):
    """query_encoder: raw query strings -> embedding / hash_code."""

    def __init__(self, encoders: Encoders):
        super().__init__(name="query_encoder")
        self.encoders = encoders

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def embed(query):
            return {S.EMBEDDING: self.encoders.embed_queries(query)}

        def code(query):
            return {S.HASH_CODE: pack_codes(self.encoders.embed_queries(query))}

        return {S.TEXT_SIGNATURE: traced(embed, QUERY_SPEC),
                S.HASH_SIGNATURE: traced(code, QUERY_SPEC)}


class ImageEncoder(tf.Module):
    """image_encoder: raw image bytes (or feature vectors) -> embedding / hash_code."""

    def __init__(self, encoders: Encoders):
        super().__init__(name="image_encoder")
        self.encoders = encoders

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def embed(images):
            return {S.EMBEDDING: self.encoders.embed_images(images)}

        def code(images):
            return {S.HASH_CODE: pack_codes(self.encoders.embed_images(images))}

        spec = self.encoders.image_spec()  # named image_bytes / image_features: the signature's input name
        return {S.TEXT_SIGNATURE: traced(embed, spec),
                S.HASH_SIGNATURE: traced(code, spec)}


class BruteForceIndex(tf.Module):
    """Exact top-k by dot product: `index(queries, k) -> (scores, ids)`, as retrieval_bruteforce serves it.

    Plain TensorFlow ops (a stock model server runs it).  The candidates are
    stored transposed, [D, N], so the matmul reads them in the layout its kernel
    streams fastest (tfrs BruteForce's `transpose_b` matmul was 1.3x slower on
    1M x 128, benchmarks/retrieval.py), and in blocks of `block_rows`: each
    block's top-k is taken and the blocks' merged, so a batch never holds a
    [batch, N] score matrix (4 GB for 100 queries over 10M images).
    """

    def __init__(self, candidates: np.ndarray, identifiers: np.ndarray, k: int,
                 block_rows: int = BRUTE_FORCE_BLOCK_ROWS, name: str = "bruteforce"):
        super().__init__(name=name)
        candidates = np.asarray(candidates, np.float32)
        # Of unknown length, so the traced graph is the same for any corpus (trainer/saved_graphs.py).
        self.blocks = [tf.Variable(candidates[start:start + block_rows].T, trainable=False,
                                   shape=tf.TensorShape([candidates.shape[1], None]), name=f"candidates_{i}")
                       for i, start in enumerate(range(0, len(candidates), block_rows))]
        self.identifiers = tf.Variable(identifiers, trainable=False, shape=tf.TensorShape([None]), name="identifiers")
        self.k = k

    def graph_key(self) -> Tuple:
        """What the traced graph reads as Python values (trainer/saved_graphs.py)."""
        return ("bruteforce", self.k, len(self.blocks))

    def __call__(self, queries: tf.Tensor, k: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        k = self.k if k is None else k
        if len(self.blocks) == 1:
            scores, indices = tf.math.top_k(tf.linalg.matmul(queries, self.blocks[0]), k)
        else:
            block_scores, block_indices, offset = [], [], 0
            for block in self.blocks:
                rows = tf.shape(block)[1]
                scores, indices = tf.math.top_k(tf.linalg.matmul(queries, block), tf.minimum(k, rows))
                block_scores.append(scores)
                block_indices.append(indices + offset)
                offset += rows
            scores, best = tf.math.top_k(tf.concat(block_scores, axis=1), k)
            indices = tf.gather(tf.concat(block_indices, axis=1), best, batch_dims=1)
        return scores, tf.gather(self.identifiers, indices)


class Retrieval(tf.Module):
    """retrieval_*: a query (text or image) -> the top-k corpus image ids and their scores.

    `top_k` is an index called as `top_k(embeddings, k=k) -> (scores, ids)`:
    trainer.scann_index.ScannIndex or BruteForceIndex.  With `binary=True` the
    index holds +1/-1 codes and queries are binarized the same way; scores are
    then the number of equal bits (dim - Hamming distance).
    """

    def __init__(self, encoders: Encoders, top_k, k: int, binary: bool = False, name: str = "retrieval"):
        super().__init__(name=name)
        self.encoders = encoders
        self.top_k = top_k
        self.k = k
        self.binary = binary

    def graph_key(self) -> Tuple:
        """What the traced signatures read as Python values: with the same key and the same encoders, two
        modules save the same graph (trainer/saved_graphs.py)."""
        return (self.name, self.k, self.binary, self.top_k.graph_key())

    def search_embeddings(self, embeddings: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Top-k for query embeddings (also used to measure recall without the encoders)."""
        if self.binary:
            embeddings = signed_code(embeddings)
        scores, ids = self.top_k(embeddings, k=self.k)
        if self.binary:
            scores = (scores + float(embeddings.shape[-1])) / 2.0
        return {S.IMAGE_IDS: ids, S.SCORES: scores}

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        def by_text(query):
            return self.search_embeddings(self.encoders.embed_queries(query))

        def by_image(images):
            return self.search_embeddings(self.encoders.embed_images(images))

        return {S.TEXT_SIGNATURE: traced(by_text, QUERY_SPEC),
                S.IMAGE_SIGNATURE: traced(by_image, self.encoders.image_spec())}
