"""The training losses on embeddings: per-example values, weighted by click weight.

Every function returns one loss value per local example; the model sums them
and divides by the GLOBAL batch size, so gradients summed over replicas equal
the single-device gradient of the whole batch.

- `softmax`: tfrs.tasks.Retrieval (in-batch sampled softmax with temperature,
  logQ correction, accidental-hit removal, extra hard-negative candidates
  masked by `score_mask` where a slot is padded).
- `triplet`: hinge `max(0, margin - s(q, pos) + s(q, neg))`, averaged over
  each query's valid negatives.
- `pairwise`: RankNet's pairwise logistic loss `log(1 + exp((s(q, neg) -
  s(q, pos)) / T))` over (query, clicked, unclicked) triples.
- `graph_loss`: the Neural Graph Machines term `sum_i w_i D(h(x), h(nbr_i))`
  with D from neural_structured_learning.
- `nt_xent_loss`: SimCLR's contrastive loss between two views of each image
  (`clicklens pretrain`, trainer/pretrain.py); one value per local view.
"""

from __future__ import annotations

import contextlib

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import neural_structured_learning as nsl
import tensorflow as tf
import tensorflow_recommenders as tfrs


def retrieval_task(temperature: float, remove_accidental_hits: bool) -> tfrs.tasks.Retrieval:
    """The softmax task; its loss returns one (sample-weighted) value per query."""
    loss = tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    with float32_policy():
        return tfrs.tasks.Retrieval(loss=loss, metrics=None, batch_metrics=None, temperature=temperature,
                                    remove_accidental_hits=remove_accidental_hits, name="retrieval")


@contextlib.contextmanager
def float32_policy():
    """Builds Keras layers under the float32 policy whatever the global mixed policy is.

    tfrs.tasks.Retrieval and the layers it creates inside `call`
    (RemoveAccidentalHits, SamplingProbablityCorrection) would otherwise
    autocast their first input to float16 / bfloat16 and clash with the
    float32 scores; the loss is computed in float32 on float32 embeddings.
    Use it around both constructing and calling the task.
    """
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


def gather_across_replicas(values: tf.Tensor) -> tf.Tensor:
    """All replicas' `values` along axis 0, this replica's own first.

    With one replica (or outside a strategy) this is the identity.  Each
    replica then scores its queries against the GLOBAL batch of candidates,
    with its own positives first, which is what tfrs.tasks.Retrieval's
    diagonal labels expect; the loss equals the single-device loss.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    # tf.identity places the value on this replica's device: MultiWorkerMirroredStrategy's all_gather
    # of a tensor taken straight from the distributed dataset fails ("destinations can not be empty").
    gathered = context.all_gather(tf.identity(values), axis=0)
    return tf.roll(gathered, -context.replica_id_in_sync_group * values.shape[0], axis=0)


def negative_mask(num_queries: int, candidate_ids: tf.Tensor, candidate_valid: tf.Tensor,
                  remove_accidental_hits: bool) -> tf.Tensor:
    """float [Q, C]: 1 where candidate c is a usable negative for query q.

    Candidate q is query q's positive; padded candidates (`candidate_valid`
    0) and, optionally, candidates with the positive's id are not negatives.
    """
    num_candidates = tf.shape(candidate_ids)[0]
    mask = (1.0 - tf.eye(num_queries, num_candidates)) * candidate_valid[tf.newaxis, :]
    if remove_accidental_hits:
        same = tf.equal(candidate_ids[:num_queries, tf.newaxis], candidate_ids[tf.newaxis, :])
        mask = mask * (1.0 - tf.cast(same, tf.float32))
    return mask


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(values * mask, axis=-1) / tf.maximum(tf.reduce_sum(mask, axis=-1), 1.0)


def triplet_loss(positive_scores, negative_scores, mask, weights, margin: float) -> tf.Tensor:
    """[Q] weights * mean over valid negatives of max(0, margin - s_pos + s_neg)."""
    hinge = tf.nn.relu(margin - positive_scores[:, tf.newaxis] + negative_scores)
    return weights * _masked_mean(hinge, mask)


def pairwise_loss(positive_scores, negative_scores, mask, weights, temperature: float) -> tf.Tensor:
    """[Q] weights * mean over valid negatives of softplus((s_neg - s_pos) / T)."""
    logistic = tf.nn.softplus((negative_scores - positive_scores[:, tf.newaxis]) / temperature)
    return weights * _masked_mean(logistic, mask)


def graph_loss(embeddings, neighbor_embeddings, neighbor_weights, distance: str) -> tf.Tensor:
    """[B] sum_i w_i * D(embeddings, neighbor_embeddings[:, i]); padded slots have w = 0.

    embeddings [B, D], neighbor_embeddings [B, K, D], neighbor_weights [B, K].
    D is NSL's 'l2' (squared Euclidean) or 'cosine' (1 - cos) distance.
    """
    config = nsl.configs.DistanceConfig(distance_type=distance, reduction=tf.compat.v1.losses.Reduction.NONE,
                                        sum_over_axis=-1)
    sources = tf.tile(embeddings[:, tf.newaxis, :], [1, neighbor_embeddings.shape[1], 1])
    weighted = nsl.lib.pairwise_distance_wrapper(sources, neighbor_embeddings,
                                                 weights=neighbor_weights[..., tf.newaxis],
                                                 distance_config=config)
    # l2 keeps the feature axis ([B, K, D]); cosine reduces it ([B, K, 1]).
    return tf.reduce_sum(tf.reshape(weighted, [tf.shape(weighted)[0], -1]), axis=1)


def nt_xent_loss(views_a: tf.Tensor, views_b: tf.Tensor, temperature: float) -> tf.Tensor:
    """[2B] SimCLR's NT-Xent: each view's softmax cross-entropy of finding its image's other view among all views.

    views_a[i] and views_b[i] are projections of two random views of image i;
    every other view of the GLOBAL batch (all replicas, both views) is a
    negative, the view itself is not a candidate.  Computed in float32 on
    L2-normalised projections, scores divided by `temperature`.
    """
    a = tf.math.l2_normalize(tf.cast(views_a, tf.float32), axis=-1)
    b = tf.math.l2_normalize(tf.cast(views_b, tf.float32), axis=-1)
    local = tf.shape(a)[0]
    # This replica's rows come first in both gathers, so local row i is global row i.
    candidates = tf.concat([gather_across_replicas(a), gather_across_replicas(b)], axis=0)  # [2N, D]
    n = tf.shape(candidates)[0] // 2
    rows = tf.range(local)

    def side(anchors, own_offset, other_offset):
        logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature
        itself = tf.one_hot(rows + own_offset, 2 * n, on_value=True, off_value=False)
        logits = tf.where(itself, -1e9, logits)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=rows + other_offset, logits=logits)

    return tf.concat([side(a, 0, n), side(b, n, 0)], axis=0)
