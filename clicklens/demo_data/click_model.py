"""A noisy production ranker and a position-based click model (Craswell et al. 2008).

The ranker orders images by true relevance plus a query-independent quality
bias plus noise, so result lists mix relevant and irrelevant images.  Users
examine position p with probability p ** -EXAMINATION_DECAY and click an
examined image with a probability that rises with its true relevance; the
two are independent, which is what makes the model position-based.  The
generator writes the examination probabilities to manifest.json
(`examination_propensities`), the truth a position-bias fit is measured
against; demo_data.ranker_quality_weight sets `quality_weight`.
Everything works on a batch of sessions at once.
"""

from __future__ import annotations

import dataclasses
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClickModel:
    """Parameters of the ranker and of the users."""

    ranker_noise: float = 0.4  # std of the ranker's error, in units of relevance
    quality_weight: float = 0.3  # how much the query-independent quality bias counts
    examination_decay: float = 0.6  # P(examine position p) = p ** -decay
    click_if_relevant: float = 0.6
    click_if_irrelevant: float = 0.03
    partial_click_gain: float = 0.15  # extra click probability per share of named attributes matched
    relevant_dwell_ms: float = 9000.0  # median dwell after a click on a relevant image
    irrelevant_dwell_ms: float = 2500.0


def rank(relevance: np.ndarray, quality: np.ndarray, depth: int, model: ClickModel,
         rng: np.random.Generator) -> np.ndarray:
    """Result lists of a noisy ranker: int [B, depth], row b the indices of session b's top images, best first.

    relevance: float [B, N] true relevance signal in [0, 1] (-inf excludes an image).
    quality: float [N] query-independent bias, e.g. how "clicky" an image is.
    """
    noise = rng.standard_normal(relevance.shape, dtype=np.float32) * model.ranker_noise
    scores = relevance + model.quality_weight * quality[None, :] + noise
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def examination_probability(positions: np.ndarray, model: ClickModel) -> np.ndarray:
    """P(a user looks at the result at 1-based `positions`)."""
    return np.power(positions.astype(np.float64), -model.examination_decay)


def text_click_probability(match_fraction: np.ndarray, appeal: np.ndarray, model: ClickModel) -> np.ndarray:
    """P(click | examined) for a text query: high iff the image has every named attribute."""
    relevant = match_fraction >= 1.0
    base = np.where(relevant, model.click_if_relevant,
                    model.click_if_irrelevant + model.partial_click_gain * match_fraction)
    return np.clip(base * appeal, 0.0, 0.95)


def image_click_probability(similarity: np.ndarray, appeal: np.ndarray, model: ClickModel) -> np.ndarray:
    """P(click | examined) for a query image: rises steeply with visual similarity."""
    base = model.click_if_irrelevant + (model.click_if_relevant + 0.1) * similarity ** 3
    return np.clip(base * appeal, 0.0, 0.95)


def sample_clicks(click_probability: np.ndarray, rng: np.random.Generator, model: ClickModel) -> np.ndarray:
    """Clicks (bool, same shape) on result lists [..., positions] under the position-based model."""
    positions = np.arange(1, click_probability.shape[-1] + 1)
    examined = rng.random(click_probability.shape) < examination_probability(positions, model)
    attracted = rng.random(click_probability.shape) < click_probability
    return examined & attracted


def sample_dwell_ms(relevant: np.ndarray, rng: np.random.Generator, model: ClickModel) -> np.ndarray:
    """Dwell time after each click, whole milliseconds: longer on relevant images."""
    median = np.where(relevant, model.relevant_dwell_ms, model.irrelevant_dwell_ms)
    sigma = np.where(relevant, 0.6, 0.8)
    return np.rint(median * np.exp(sigma * rng.standard_normal(relevant.shape)))
