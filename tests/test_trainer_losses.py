"""Each loss of TwoTowerModel on hand-made embeddings, against numpy re-computations.

The towers are identities, so the batch's "query tokens" and "images" are the
embeddings themselves and the whole loss wiring of the model is exercised.
"""

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from tests.trainer_synthetic import trainer_config
from trainer import input as I
from trainer import losses
from trainer.model import TwoTowerModel


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


QUERY = unit([[1, 0.2], [0.1, 1], [-1, 0.3], [0.5, 0.5]])
IMAGE = unit([[0.9, 0.1], [0.9, 0.1], [-1, -0.2], [0.7, 0.1]])
IMAGE_KEY = np.array([10, 10, 12, 13], np.int64)  # rows 0 and 1 share an image: an accidental hit
WEIGHT = np.array([1.0, 2.0, 0.5, 0.0], np.float32)  # row 3 is an image-only node
PROB = np.array([0.1, 0.2, 0.05, 0.1], np.float32)
NEG = unit([[[0, 1]], [[1, 0]], [[1, 1]], [[-1, 1]]])  # [B, J=1, D]
NEG_KEY = np.array([[20], [21], [22], [23]], np.int64)
NEG_MASK = np.array([[1], [1], [0], [1]], np.float32)  # row 2's negative slot is padded
NBR = unit([[[1, 0], [0, 1]], [[0.1, 1], [5, 5]], [[-1, 0], [1, 1]], [[1, 1], [1, -1]]])  # [B, K=2, D]
NBR_W = np.array([[0.5, 1.0], [2.0, 0.0], [1.0, 0.0], [0.3, 0.7]], np.float32)  # 0 = padded slot
NBR_KEY = np.array([[30, 31], [32, 33], [34, 35], [36, 37]], np.int64)


def batch(**replace):
    values = {I.QUERY_TOKENS: QUERY, I.IMAGE: IMAGE, I.IMAGE_KEY: IMAGE_KEY, I.CLICK_WEIGHT: WEIGHT,
              I.CANDIDATE_PROBABILITY: PROB, I.NEGATIVE_IMAGES: NEG, I.NEGATIVE_KEYS: NEG_KEY,
              I.NEGATIVE_MASK: NEG_MASK, I.NEIGHBOR_IMAGES: NBR, I.NEIGHBOR_WEIGHTS: NBR_W, I.NEIGHBOR_KEYS: NBR_KEY}
    values.update(replace)
    return {k: tf.constant(v) for k, v in values.items() if v is not None}


def model(*overrides):
    config = trainer_config(list(overrides))
    identity = tf.keras.layers.Activation("linear")
    return TwoTowerModel(config, identity, identity)


def parts(m, inputs):
    return {k: float(v) for k, v in m.loss_parts(inputs).items()}


def all_candidates():
    cands = np.concatenate([IMAGE, NEG.reshape(-1, 2)])
    ids = np.concatenate([IMAGE_KEY, NEG_KEY.reshape(-1)])
    # An image-only node (click weight 0, row 3) is no one's candidate; every row keeps its own positive.
    valid = np.concatenate([(WEIGHT > 0).astype(np.float32), NEG_MASK.reshape(-1)])
    return cands, ids, valid


def test_softmax_is_click_weighted_logq_corrected_softmax_with_masks():
    m = model("training.loss=softmax", "training.temperature=0.5", "training.graph_multiplier=0")
    cands, ids, valid = all_candidates()
    prob = np.concatenate([PROB, np.full(4, PROB.mean())])
    logits = QUERY @ cands.T / 0.5 - np.log(prob)[None, :]
    expected = 0.0
    for i in range(4):
        row = logits[i].copy()
        for c in range(len(cands)):
            if c != i and (ids[c] == IMAGE_KEY[i] or not valid[c]):
                row[c] = -np.inf
        expected += WEIGHT[i] * -(row[i] - np.log(np.exp(row[np.isfinite(row)]).sum()))
    got = parts(m, batch())
    assert got["retrieval_loss"] == pytest.approx(expected / 4, rel=1e-5)
    assert got["graph_loss"] == 0.0


def test_softmax_options_change_the_loss():
    # A warm temperature, so the accidental hit (rows 0 and 1) weighs visibly in the softmax.
    base = parts(model("training.graph_multiplier=0", "training.temperature=1.0"), batch())["retrieval_loss"]
    for option in ("training.logq_correction=false", "training.remove_accidental_hits=false"):
        other = parts(model("training.graph_multiplier=0", "training.temperature=1.0", option),
                      batch())["retrieval_loss"]
        assert other != pytest.approx(base, rel=1e-4), option


def test_triplet_is_mean_hinge_over_valid_negatives():
    m = model("training.loss=triplet", "training.triplet_margin=0.3", "training.graph_multiplier=0",
              "training.remove_accidental_hits=true")
    cands, ids, valid = all_candidates()
    scores = QUERY @ cands.T
    expected = 0.0
    for i in range(4):
        negs = [c for c in range(len(cands)) if c != i and valid[c] and ids[c] != IMAGE_KEY[i]]
        hinge = [max(0.0, 0.3 - scores[i, i] + scores[i, c]) for c in negs]
        expected += WEIGHT[i] * np.mean(hinge)
    assert parts(m, batch())["retrieval_loss"] == pytest.approx(expected / 4, rel=1e-5)


def test_pairwise_uses_the_examples_own_unclicked_images():
    m = model("training.loss=pairwise", "training.temperature=0.25", "training.graph_multiplier=0")
    expected = 0.0
    for i in range(4):
        pos = QUERY[i] @ IMAGE[i]
        terms = [np.log1p(np.exp((QUERY[i] @ NEG[i, j] - pos) / 0.25)) for j in range(1) if NEG_MASK[i, j]]
        expected += WEIGHT[i] * (np.mean(terms) if terms else 0.0)
    assert parts(m, batch())["retrieval_loss"] == pytest.approx(expected / 4, rel=1e-5)


def test_pairwise_without_hard_negatives_uses_in_batch_negatives():
    m = model("training.loss=pairwise", "training.temperature=0.25", "training.graph_multiplier=0",
              "pipeline.hard_negatives=0")
    inputs = batch(**{I.NEGATIVE_IMAGES: None, I.NEGATIVE_KEYS: None, I.NEGATIVE_MASK: None})
    scores = QUERY @ IMAGE.T
    expected = 0.0
    for i in range(4):
        negs = [c for c in range(4) if c != i and IMAGE_KEY[c] != IMAGE_KEY[i] and WEIGHT[c] > 0]
        expected += WEIGHT[i] * np.mean([np.log1p(np.exp((scores[i, c] - scores[i, i]) / 0.25)) for c in negs])
    assert parts(m, inputs)["retrieval_loss"] == pytest.approx(expected / 4, rel=1e-5)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_graph_term_is_multiplier_times_sum_of_weighted_distances(distance):
    m = model("training.graph_multiplier=0.7", f"training.graph_distance={distance}")
    expected = 0.0
    for b in range(4):
        for k in range(2):
            if distance == "l2":
                d = np.sum((IMAGE[b] - NBR[b, k]) ** 2)
            else:
                d = 1.0 - IMAGE[b] @ NBR[b, k] / np.linalg.norm(NBR[b, k])
            expected += NBR_W[b, k] * d
    got = parts(m, batch())
    assert got["graph_loss"] == pytest.approx(0.7 * expected / 4, rel=1e-5)
    # The image-only node (row 3, click weight 0) contributes its graph term alone.
    only_row3 = np.zeros_like(NBR_W)
    only_row3[3] = NBR_W[3]
    assert parts(m, batch(**{I.NEIGHBOR_WEIGHTS: only_row3}))["graph_loss"] > 0


def test_graph_term_ignores_padded_neighbours_and_is_zero_for_multiplier_zero():
    m = model("training.graph_multiplier=0.7")
    moved = NBR.copy()
    moved[NBR_W == 0] = unit([[-3, 7]])[0]  # change only the padded slots
    assert parts(m, batch())["graph_loss"] == pytest.approx(parts(m, batch(**{I.NEIGHBOR_IMAGES: moved}))["graph_loss"],
                                                            rel=1e-6)
    off = model("training.graph_multiplier=0")
    assert parts(off, batch())["graph_loss"] == 0.0
    assert parts(off, batch())["retrieval_loss"] == pytest.approx(parts(m, batch())["retrieval_loss"], rel=1e-6)


def test_graph_loss_function_directly():
    emb = tf.constant(unit([[1, 0], [0, 1]]))
    nbrs = tf.constant(unit([[[0, 1], [1, 0]], [[0, 1], [1, 1]]]))
    w = tf.constant([[2.0, 5.0], [0.0, 1.0]])
    got = losses.graph_loss(emb, nbrs, w, "l2").numpy()
    second = float(np.sum((unit([[0, 1]])[0] - unit([[1, 1]])[0]) ** 2))
    assert got == pytest.approx([2.0 * 2.0 + 5.0 * 0.0, 0.0 + 1.0 * second], rel=1e-5)
