"""Typed run configuration: the one contract for every setting clicklens reads.

A run config is a YAML file with one mapping per section (`demo_data`,
`pipeline`, `model`, `training`, `pretrain`, `export`, `serving`).  Each section is a
dataclass below; `load_config` reads the file, applies `--set section.key=value`
overrides and validates every value, so a typo or an out-of-range number fails
at load time with the file and the key named, not an hour into a TPU job.

Field metadata carries the checks: `min` / `max` bounds (inclusive) and, for
strings, `choices`, plus a `help` text; `clicklens config` prints every key
with its value, type, bounds and help.  Keys missing from the YAML keep their
defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import re
import sys
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from clicklens.errors import ClicklensError
from clicklens.vocabulary import RESERVED_TOKENS as _RESERVED_TOKENS

DEFAULT_CONFIG = "configs/demo.yaml"
# The same file inside the installed package (a link to configs/demo.yaml in the repository; a copy in a wheel),
# read when DEFAULT_CONFIG is not found from the current directory: an installed clicklens runs from anywhere.
PACKAGED_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.yaml")


class ConfigError(ClicklensError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _field(default, *, min=None, max=None, choices=None, help=""):
    """A dataclass field with validation metadata."""
    metadata = {"min": min, "max": max, "choices": choices, "help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DemoDataConfig:
    """The generated demo world (`clicklens generate-demo-data`)."""

    seed: int = _field(20261122, min=0)
    num_images: int = _field(2000, min=10)
    image_size: int = _field(64, min=16, max=512, help="Side of the generated PNGs, pixels.")
    num_sessions: int = _field(50000, min=10)
    num_log_shards: int = _field(4, min=1, max=1024)
    min_impressions: int = _field(10, min=1)
    max_impressions: int = _field(20, min=1)
    query_by_image_fraction: float = _field(0.1, min=0.0, max=1.0)
    chinese_fraction: float = _field(0.4, min=0.0, max=1.0)
    malformed_lines: int = _field(200, min=0)
    broken_images: int = _field(4, min=0, help="Extra catalog entries whose image file is missing or corrupt.")
    cold_fraction: float = _field(0.2, min=0.0, max=0.9,
                                  help="Share of catalog images never shown in any session (new uploads).")
    ranker_quality_weight: float = _field(0.3, min=0.0, max=10.0,
                                          help="How much the old ranker's query-independent quality bias counts "
                                               "against true relevance (what a position-blind learner inherits).")
    # The daily loop (clicklens update): several days of logs, with tastes that drift.
    days: int = _field(1, min=1, max=366, help="Days the sessions are spread over, evenly; more than 1 writes "
                                               "raw/logs/dt=YYYY-MM-DD/ partitions and one ground truth per day "
                                               "(raw/ground_truth/dt=YYYY-MM-DD.jsonl).")
    drift_day: int = _field(0, min=0, max=366, help="From this day on (1 = the first), the queries naming a "
                                                    "drifted word mean another intent: their clicks and ground "
                                                    "truth move to that intent's images; 0 = no drift.")
    drift_fraction: float = _field(0.15, min=0.0, max=1.0, help="Share of the attribute values (colours, shapes, "
                                                                "...) whose words come to mean another value of "
                                                                "the same kind on drift_day; every query naming "
                                                                "one drifts.")


@dataclasses.dataclass
class ContentGraphConfig:
    """The content-similarity graph: every catalog image's nearest neighbours by content (LSH)."""

    source: str = _field("pixels", choices=["none", "pixels", "features", "model"],
                         help="Content embedding: a pixel descriptor, the catalog's feature vectors, or the newest "
                              "exported image_encoder (RunInference); none builds the click graph only.")
    model_dir: str = _field("", help="source=model: an image_encoder version folder, or a base folder whose newest "
                                     "version is used; empty means <workdir>/export/image_encoder.")
    neighbors: int = _field(3, min=1, max=64, help="Content neighbours kept per image (before merging).")
    min_similarity: float = _field(0.5, min=-1.0, max=1.0, help="Cosine similarity below which no content edge is made.")
    weight: float = _field(0.5, min=0.0, help="Content edge weight = weight x cosine similarity.")
    lsh_rounds: int = _field(14, min=1, max=256, help="LSH rounds (independent sets of random hyperplanes); more "
                                                      "find more of the true neighbours, each costs one more pass.")
    bucket_size: int = _field(512, min=2, max=1_000_000,
                              help="Images per LSH bucket: each round uses floor(log2(images / bucket_size)) "
                                   "hyperplanes, so the work per image does not grow with the catalog.")
    max_bucket: int = _field(512, min=2, max=1_000_000,
                             help="A bucket larger than this is cut into pieces of images that agree on further "
                                  "hyperplanes (clustered data fill some buckets far above the average).")
    batch_size: int = _field(64, min=1, max=65536, help="source=model: images per RunInference batch.")


@dataclasses.dataclass
class PipelineConfig:
    """The Beam pipeline that turns logs into training examples."""

    logs: str = _field("", help="Glob of JSONL(.gz) log files; empty means <workdir>/raw/logs/*.jsonl*.")
    catalog: str = _field("", help="Image catalog JSONL; empty means <workdir>/raw/catalog.jsonl.")
    image_size: int = _field(32, min=8, max=1024, help="Images are resized to this square size.")
    # A 40-megapixel photo decodes to 120 MB of uint8, 480 MB as float32.
    allow_outside_uris: bool = _field(False, help="Let catalog uris name files outside the catalog's folder (or "
                                                   "bucket); otherwise such images are dead-lettered unread.")
    max_image_pixels: int = _field(40_000_000, min=1, help="Images declaring more pixels (width x height) are "
                                                           "refused before decoding: pipeline, export, serving.")
    image_source: str = _field("pixels", choices=["pixels", "features"])
    feature_dim: int = _field(0, min=0, help="Length of catalog feature vectors when image_source=features.")
    # The daily loop: a window of dated logs, recent days weighing more (clicklens update).
    as_of: str = _field("", help="YYYY-MM-DD: the last (UTC) day of logs read; empty = all logs.  Partitions "
                                 "logs/dt=YYYY-MM-DD/ outside the window are not read; other records count on "
                                 "the UTC day of their `time`.")
    window_days: int = _field(0, min=0, max=100_000, help="Days of logs read, as_of included; 0 = every day up to "
                                                          "as_of.  The pipeline needs as_of with it (`clicklens "
                                                          "update --as-of` sets it).")
    half_life_days: float = _field(0.0, min=0.0, help="Each record's impressions and clicks weigh "
                                                      "0.5^(age / half_life_days), age in whole days before as_of "
                                                      "(0 on as_of); 0 = every record weighs 1.  The pipeline needs as_of "
                                                      "with it.")
    base_vocab: str = _field("", help="A vocab.txt (an earlier run's) whose tokens keep their ids: newly learned "
                                      "tokens are appended after them, so a warm-started model keeps its trained "
                                      "rows; empty = learn the vocabulary from scratch.")
    vocab_capacity: int = _field(0, min=0, help="With base_vocab: tokens in all at most (new tokens past it are "
                                                "left out); 0 = 2 x vocab_size.")
    # Click statistics and pair selection.
    ctr_prior_impressions: float = _field(10.0, min=0.0, help="Beta prior strength for smoothed CTR.")
    ctr_prior: float = _field(0.05, min=0.0, max=1.0, help="Prior mean CTR for smoothing.")
    min_clicks: int = _field(1, min=0)
    top_n_per_query: int = _field(50, min=1)
    ctr_threshold_default: float = _field(0.0, min=0.0, max=1.0)
    ctr_threshold_by_category: Dict[str, float] = _field({}, min=0.0, max=1.0)
    entity_patterns: List[str] = _field([], help="Regexes; matching queries get at most entity_cap examples.")
    entity_cap: int = _field(5, min=1)
    # Position bias (beam_pipelines/position_bias.py): clicks as evidence, not votes.
    position_bias: str = _field("none", choices=["none", "pbm"],
                                help="pbm: fit a position-based click model by EM on the logs and select and weight "
                                     "pairs by debiased clicks and CTR (propensities in report.json and "
                                     "position_bias.png); none: raw clicks and CTR.")
    position_bias_by: str = _field("none", choices=["none", "locale", "category"],
                                   help="pbm: one set of propensities per log locale or query category.")
    position_bias_iterations: int = _field(1000, min=1, help="pbm: EM iterations at most; a fit that has not "
                                                              "converged by then stops the run.")
    position_bias_tolerance: float = _field(1e-5, min=1e-12, max=0.1,
                                            help="pbm: EM has converged when no relative propensity moves more.")
    position_bias_min_impressions: int = _field(10, min=1, help="pbm: the fit uses (query, image) pairs with at "
                                                                 "least this many impressions at 2+ positions.")
    propensity_clip: float = _field(0.1, min=0.001, max=1.0, help="pbm: smallest propensity an impression is "
                                                                    "divided by (inverse-propensity weight <= 1/clip).")
    min_dwell_ms: float = _field(0.0, min=0.0, help="A click with a dwell below this counts dwell/min_dwell_ms of "
                                                    "a click in the debiased figures; 0 = off.")
    # Hostile input: robots, scrapers and broken shards (beam_pipelines/sessions.py, parse.py).
    max_clicks_per_session: int = _field(100, min=0, help="A session (all its records) with more clicks is taken for a "
                                                          "robot and dropped whole, clicks and impressions, before click "
                                                          "stats and the graph (dead letter session_click_cap); 0 = no cap.")
    max_clicks_per_session_query: int = _field(50, min=0, help="The same for the clicks of one session on one query "
                                                               "(text or query image); 0 = no cap.")
    skip_corrupt_files: bool = _field(False, help="A truncated or not really gzip .gz log shard is dead-lettered "
                                                  "(corrupt_file, with the lines read before the fault, which are "
                                                  "kept) and counted in the report; otherwise it stops the run.")
    # Image-image graph.
    coclick_weight: float = _field(1.0, min=0.0)
    similar_click_weight: float = _field(1.0, min=0.0)
    min_edge_weight: float = _field(0.05, min=0.0)
    max_neighbors: int = _field(3, min=0, max=64)
    content_graph: ContentGraphConfig = dataclasses.field(default_factory=ContentGraphConfig)
    # Extra features and outputs.
    hard_negatives: int = _field(0, min=0, max=64)
    eval_fraction: float = _field(0.1, min=0.0, max=0.9)
    vocab_size: int = _field(4000, min=100)
    num_shards: int = _field(2, min=1, max=10000)


@dataclasses.dataclass
class ModelConfig:
    """The two-tower model."""

    embedding_dim: int = _field(64, min=2, max=4096)
    max_query_tokens: int = _field(16, min=1, max=512)
    token_embedding_dim: int = _field(64, min=2, max=4096)
    query_tower: str = _field("mean", choices=["mean", "transformer"])
    transformer_layers: int = _field(1, min=1, max=24)
    transformer_heads: int = _field(2, min=1, max=64)
    image_tower: str = _field("cnn", choices=["cnn", "backbone", "features"])
    backbone: str = _field("MobileNetV3Small", choices=["EfficientNetB0", "ResNet50", "MobileNetV3Small"])
    backbone_weights: str = _field("", help="Local weights file for the backbone; empty trains from scratch.")
    cnn_filters: List[int] = _field([32, 64, 128], min=1)
    dropout: float = _field(0.0, min=0.0, max=0.9)
    image_init: str = _field("random", choices=["random", "pretrained"],
                             help="pretrained: `train` starts the image tower from the weights `clicklens pretrain` "
                                  "wrote (self-supervised on every catalog image); random: from scratch.")
    image_init_path: str = _field("", help="image_init=pretrained: the pretrained tower's weights (a save_weights "
                                           "prefix); empty means <workdir>/pretrain/image_tower/weights.")


@dataclasses.dataclass
class AugmentConfig:
    """The two random views of each image that pretraining contrasts (trainer/augment.py); 0 turns a jitter off."""

    crop_min_area: float = _field(0.6, min=0.05, max=1.0, help="Random resized crop: each view keeps a random "
                                                               "region of at least this share of the image, "
                                                               "resized back to image_size; 1 = no zoom in.")
    # Zooming out is what taught "same shape, any size" best on the demo world (README, "Pretraining").
    crop_max_area: float = _field(2.0, min=1.0, max=16.0, help="Random resized crop: the region's largest "
                                                               "share of the image's area; above 1 a view "
                                                               "can zoom out, the object shrinking inside "
                                                               "the image's border colour; 1 = no zoom out.")
    crop_max_aspect: float = _field(1.33, min=1.0, max=4.0, help="Random resized crop: the region's aspect "
                                                                 "ratio is drawn from [1/this, this].")
    flip: bool = _field(True, help="Random left-right flip of each view.")
    jitter_probability: float = _field(0.8, min=0.0, max=1.0, help="Share of views that get the colour "
                                                                   "jitters below (those that are not 0).")
    # Jitter is on by default although queries name colours: without it the tower tells images apart by their
    # exact shades (the demo: image -> image recall@10 0.035 without, 0.109 with; README, "Pretraining").
    brightness: float = _field(0.4, min=0.0, max=1.0, help="Colour jitter: add a random value in +/- this.")
    contrast: float = _field(0.4, min=0.0, max=0.9, help="Colour jitter: scale contrast by a factor in 1 +/- this.")
    saturation: float = _field(0.4, min=0.0, max=0.9, help="Colour jitter: scale saturation by a factor in 1 +/- "
                                                           "this (0 keeps colours as they are).")
    hue: float = _field(0.05, min=0.0, max=0.5, help="Colour jitter: rotate hue by up to +/- this share of the "
                                                     "colour wheel; keep it small when users search by colour.")
    grayscale_probability: float = _field(0.0, min=0.0, max=1.0, help="Share of views turned to grey; keep 0 "
                                                                      "when users search by colour.")
    # Blur on half the views lets stripes and dots fade, so look-alikes that differ in pattern come closer.
    blur_probability: float = _field(0.5, min=0.0, max=1.0, help="Share of views blurred (Gaussian of "
                                                                 "blur_sigma pixels, at a random strength).")
    blur_sigma: float = _field(1.0, min=0.1, max=10.0, help="Blur: the Gaussian's standard deviation, pixels.")


@dataclasses.dataclass
class PretrainConfig:
    """Self-supervised (SimCLR) pretraining of the image tower on every corpus image (`clicklens pretrain`)."""

    # Strategy, precision, optimizer, learning-rate schedule, checkpoints, progress lines and seed come from
    # the `training` section, as for `clicklens train`.

    # The defaults are the best of a sweep on the demo world (README, "Pretraining"): no projection head, crops of
    # 60 % to 200 % of the image, blur on half the views, 16 images a step (fewer views of look-alike images as
    # negatives), 100 epochs.
    epochs: int = _field(100, min=1, help="Passes over the corpus (every decodable catalog image, logged or not).")
    steps_per_epoch: int = _field(0, min=0, help="0 means one pass over the corpus in whole global batches.")
    per_replica_batch_size: int = _field(16, min=2, help="Images per replica per step; each gives two views, "
                                                          "and every other view of the global batch is a negative.")
    learning_rate: float = _field(0.003, min=0.0, max=10.0, help="Peak learning rate (training.lr_schedule).")
    temperature: float = _field(0.1, min=1e-3, max=10.0, help="NT-Xent softmax temperature.")
    projection_dim: int = _field(0, min=0, max=4096, help="0: the loss is on the tower's own embeddings (what "
                                                           "retrieval and the content graph compare); N: on the "
                                                           "N-wide output of a projection head, dropped after "
                                                           "pretraining.")
    projection_hidden: int = _field(128, min=0, max=8192, help="Hidden width of the projection head (when "
                                                               "projection_dim is not 0); 0 = a linear head.")
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class TrainingConfig:
    """Optimisation, loss, distribution and run management."""

    strategy: str = _field("cpu", choices=["auto", "tpu", "mirrored", "multiworker", "cpu"])
    tpu: str = _field("local", help="TPU name or address for TPUClusterResolver.")
    precision: str = _field("float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    per_replica_batch_size: int = _field(128, min=1)
    epochs: int = _field(5, min=1)
    steps_per_epoch: int = _field(0, min=0, help="0 means one pass over the training data.")
    steps_per_execution: int = _field(1, min=1)
    learning_rate: float = _field(0.002, min=0.0, max=10.0, help="Peak learning rate (after warmup).")
    lr_schedule: str = _field("warmup_cosine", choices=["constant", "warmup_cosine"],
                              help="warmup_cosine: linear warmup, then cosine decay to 0 at the end of `epochs`.")
    warmup_fraction: float = _field(0.05, min=0.0, max=0.5, help="Share of all steps spent warming up.")
    optimizer: str = _field("adam", choices=["adam", "adagrad", "sgd"])
    loss: str = _field("softmax", choices=["softmax", "triplet", "pairwise"])
    temperature: float = _field(0.05, min=1e-4, max=100.0)
    triplet_margin: float = _field(0.2, min=0.0)
    logq_correction: bool = _field(True)
    remove_accidental_hits: bool = _field(True)
    graph_multiplier: float = _field(0.1, min=0.0)
    graph_distance: str = _field("l2", choices=["l2", "cosine"])
    graph_neighbor_gradient: bool = _field(True, help="false (opt-in, not NSL's exact gradient): neighbours that are "
                                                      "not also positives or hard negatives of the batch get a "
                                                      "forward pass only, their embeddings held constant.")
    graph_neighbor_table_steps: int = _field(0, min=0, help="Opt-in, not NSL's exact gradient: > 0 takes "
                                                           "neighbours' embeddings from a table of every corpus "
                                                           "image's embedding, recomputed every this many steps, "
                                                           "without gradient (the tower embeds only positives and "
                                                           "hard negatives); needs training.image_table and "
                                                           "pipeline.image_source pixels.  0: "
                                                           "neighbours go through the tower at every step.")
    graph_batches: bool = _field(False, help="Opt-in: with the graph term on and the image table, build each "
                                             "training batch so that its examples' neighbours are mostly "
                                             "other examples' positives (fewer distinct images for the tower; "
                                             "look-alikes become each other's in-batch negatives more often).")
    image_chunk_size: int = _field(32, min=0, help="Each distinct image of a batch goes through the image tower "
                                                   "once; with static shapes (TPUs, or dynamic_image_batch: "
                                                   "false) this many per call; 0 = every slot in one call (no "
                                                   "de-duplication).")
    dynamic_image_batch: bool = _field(True, help="On CPUs and GPUs, a batch's distinct images go through the "
                                                  "image tower in one call of their exact number (a batch size "
                                                  "that changes from step to step).  false: in static chunks of "
                                                  "image_chunk_size, as always under TPUStrategy.")
    early_stopping_patience: int = _field(0, min=0, help="Epochs without improvement before stopping; 0 turns "
                                                        "early stopping off.")
    early_stopping_metric: str = _field("recall@10", choices=["recall@10", "ndcg@10", "loss"],
                                        help="Watched on the eval split after each epoch: a retrieval metric over "
                                             "the whole corpus, or the eval loss.")
    early_stopping_start_epoch: Optional[int] = _field(None, min=0, help="Epochs after which epochs without "
                                                                         "improvement start to count; null = half "
                                                                         "of the run's epochs (the cosine has then "
                                                                         "brought the learning rate below half its "
                                                                         "peak; earlier, eval noise can stop a run "
                                                                         "that is still learning); 0 = from the "
                                                                         "first epoch.")
    warm_start: str = _field("none", help="none: random initial weights; latest: a new run (after a finished "
                                          "one in this work directory) starts from its final checkpoint; a path: "
                                          "from that checkpoint (a prefix, a checkpoint folder or a work "
                                          "directory).  Token rows are carried over by token, new tokens start "
                                          "random; the optimizer starts fresh unless "
                                          "training.warm_start_optimizer.")
    warm_start_optimizer: bool = _field(False, help="A warm-started run also takes over the earlier run's optimizer "
                                                    "slots (Adam's moments, Adagrad's accumulators; token rows by "
                                                    "token, new tokens' rows zero).  The step counter is not "
                                                    "taken over, so the learning-rate schedule starts again.")
    warm_start_epochs: int = _field(0, min=0, help="Epochs of a warm-started run (it starts from trained weights, "
                                                   "so fewer are needed); 0 = training.epochs.")
    checkpoint_every_steps: int = _field(200, min=1)
    log_every_steps: int = _field(50, min=1, help="A progress line (loss, examples/s, ETA) every this many steps.")
    seed: int = _field(7, min=0)
    shuffle_buffer: int = _field(10000, min=1)
    augment: bool = _field(True, help="Random flips and brightness / contrast jitter of training pixels (each "
                                      "distinct image of a batch once, wherever it appears).")
    image_table: bool = _field(True, help="Prepare every corpus image once into a uint8 table in host memory "
                                          "(images x image_size^2 x 3 bytes) and look examples' images up by id; "
                                          "false decodes each example's own PNGs at every step.")


@dataclasses.dataclass
class ScannConfig:
    """ScaNN index parameters (trainer/scann_index.py); null / auto = chosen and tuned at export."""

    # A key left null (auto) is chosen from the corpus size and dimension, then export's tuning pass keeps
    # the fastest setting whose recall@k against exact search is >= export.min_recall
    # (trainer/scann_tuning.py); a key given a value is used as given.
    num_leaves: Optional[int] = _field(None, min=1, help="k-means partitions; 1 = none (every query scores the "
                                                         "whole corpus); null = auto: 1 under 20,000 images, "
                                                         "else about sqrt(corpus size).")
    num_leaves_to_search: Optional[int] = _field(None, min=1, help="Partitions scored per query; null = tuned.")
    quantization: str = _field("auto", choices=["auto", "ah", "none"],
                               help="How the searched partitions are scored: ah = 4-bit anisotropic hashing "
                                    "codes, then exact re-scoring of the best; none = exact float32 scores; "
                                    "auto = ah from 20,000 images, else none.")
    dimensions_per_block: Optional[int] = _field(None, min=1, help="ah: dimensions per 4-bit code (more: smaller "
                                                                   "index, lower recall); null = 2.")
    num_reordering_candidates: Optional[int] = _field(None, min=0, help="ah: candidates re-scored exactly "
                                                                        "(>= export.k; 0 = no re-scoring and no "
                                                                        "float32 copy of the corpus); null = tuned.")


@dataclasses.dataclass
class ExportConfig:
    """SavedModels for TF Serving."""

    k: int = _field(10, min=1, max=10000)
    version: int = _field(0, min=0, help="0 means one above the newest existing version.")
    hamming: bool = _field(False, help="Brute-force retrieval by Hamming distance of binary codes.")
    keep_versions: int = _field(2, min=1, max=100,
                                help="models.config asks the server to keep this many latest versions loaded.")
    min_recall: float = _field(0.95, min=0.0, max=1.0, help="Auto export.scann keys: the fastest setting whose "
                                                            "recall@k against exact search is at least this.")
    gate_metric: str = _field("recall@10", choices=["recall@10", "ndcg@10"],
                              help="`export --gate`: the eval metric the candidate and the served model are "
                                   "compared on (same eval set, same code).")
    gate_tolerance: float = _field(0.01, min=0.0, max=1.0, help="`export --gate` publishes when the candidate's "
                                                                "gate_metric >= the served version's - this.")
    scann: ScannConfig = dataclasses.field(default_factory=ScannConfig)


@dataclasses.dataclass
class BatchingConfig:
    """Request batching with TF Serving's BatchingParameters (serving/batcher.py); off by default, as in TF Serving."""

    enabled: bool = _field(False, help="Merge concurrent Predict requests (gRPC and REST) of one model, version and "
                                       "signature into one call (tensorflow_model_server --enable_batching).")
    batching_parameters_file: str = _field("", help="A TF Serving BatchingParameters text proto "
                                                    "(--batching_parameters_file), so one file serves both servers; "
                                                    "it then holds every parameter (those it leaves out take TF "
                                                    "Serving's defaults) and the keys below must keep their defaults.")
    max_batch_size: int = _field(1000, min=1, help="Rows in one merged batch at most; a request with more rows gets "
                                                   "INVALID_ARGUMENT.")
    batch_timeout_micros: int = _field(0, min=0, help="How long the oldest queued request may wait for a fuller "
                                                      "batch once a batch thread is free; 0 runs what is queued.")
    num_batch_threads: int = _field(0, min=0, max=1024, help="Threads running batches, shared by all models; "
                                                             "0 = the number of CPUs (TF Serving's default).")
    max_enqueued_batches: int = _field(10, min=1, help="Queue bound per model, version and signature, in batches "
                                                       "of max_batch_size rows; past it requests get UNAVAILABLE.")
    allowed_batch_sizes: List[int] = _field([], min=1, help="Sizes a merged batch is padded up to (increasing, "
                                                            "the last = max_batch_size); empty = no padding.")
    pad_variable_length_inputs: bool = _field(False, help="Pad inputs whose non-batch dimensions differ between "
                                                          "requests to the largest, so they share a batch.")


@dataclasses.dataclass
class MonitoringConfig:
    """Prometheus metrics on the REST port, with TF Serving's metric names (serving/metrics.py)."""

    enabled: bool = _field(False, help="Serve the metrics page (TF Serving's prometheus_config.enable).")
    path: str = _field("/monitoring/prometheus/metrics",
                       help="Where the metrics page is served (prometheus_config.path).")
    monitoring_config_file: str = _field("", help="A TF Serving MonitoringConfig text proto "
                                                  "(--monitoring_config_file); when set it decides, and enabled / "
                                                  "path must keep their defaults.")


@dataclasses.dataclass
class ServingConfig:
    """The local TF Serving API server and the search page."""

    host: str = _field("127.0.0.1")
    grpc_port: int = _field(8500, min=0, max=65535)
    http_port: int = _field(8501, min=0, max=65535)
    max_request_bytes: int = _field(4 * 1024 * 1024, min=1024)
    max_batch: int = _field(256, min=1)
    poll_seconds: float = _field(2.0, min=0.1, help="How often new model versions are looked for.")
    num_load_threads: int = _field(0, min=0, max=64, help="Versions loaded at once, on their own threads, while "
                                   "polling goes on (TF Serving's --num_load_threads); 0 loads them one after "
                                   "another within the poll that found them.")
    num_warmup_threads: int = _field(1, min=1, max=64, help="Warmup requests of one version replayed at once "
                                     "(TF Serving's ModelWarmupOptions.num_model_warmup_threads, default 1): with "
                                     "2, a retrieval model's text and image signatures warm up side by side.")
    workers: int = _field(8, min=1, max=256, help="gRPC worker threads (for every method but batched Predicts, "
                                                  "which wait for their batch on the event loop), and the most "
                                                  "Predicts in flight at once, so also the most gRPC requests one "
                                                  "merged batch can hold.")
    image_call_slots: int = _field(2, min=1, max=256, help="Model calls with image inputs that run at once; the "
                                   "rest wait.  Each may decode up to max_batch images of up to "
                                   "pipeline.max_image_pixels pixels, so this bounds the memory image requests take.")
    http_backlog: int = _field(1024, min=1, max=65535, help="Listen backlog of the REST port: connections the "
                               "kernel holds until the server accepts them (the kernel caps it at "
                               "net.core.somaxconn).")
    http_max_connections: int = _field(1000, min=1, max=100_000, help="REST connections open at once, one thread "
                                       "each; further connections wait in the backlog until one closes.")
    http_timeout_seconds: float = _field(30.0, min=0.05, max=3600.0, help="REST: the longest wait for the next "
                                         "bytes of a request's headers, and the most time its whole body may take "
                                         "to arrive (then 408 and the connection closes).")
    http_idle_timeout_seconds: float = _field(75.0, min=0.05, max=3600.0, help="A keep-alive REST connection "
                                              "without a request for this long is closed; behind a load balancer, "
                                              "make it longer than the balancer's idle timeout.")
    allow_version_labels_for_unavailable_models: bool = _field(
        False, help="Let models.config version_labels name versions that are not AVAILABLE (TF Serving's flag); "
                    "otherwise the server refuses to start.")
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    monitoring: MonitoringConfig = dataclasses.field(default_factory=MonitoringConfig)


def _serving_checks(serving: ServingConfig, source: str) -> None:
    """serving.batching and serving.monitoring constraints (TF Serving's own checks on the same parameters)."""
    b = serving.batching
    if b.batching_parameters_file:
        if not b.enabled:
            raise ConfigError(f"{source}: serving.batching.batching_parameters_file: needs serving.batching.enabled "
                              "true (as --batching_parameters_file needs --enable_batching)")
        for f in dataclasses.fields(BatchingConfig):
            if f.name not in ("enabled", "batching_parameters_file") and getattr(b, f.name) != getattr(
                    BatchingConfig(), f.name):
                raise ConfigError(f"{source}: serving.batching.{f.name}: must keep its default when "
                                  "serving.batching.batching_parameters_file is set (the file holds every parameter)")
    sizes = b.allowed_batch_sizes
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ConfigError(f"{source}: serving.batching.allowed_batch_sizes: entries must be increasing, got {sizes}")
    if sizes and sizes[-1] != b.max_batch_size:
        raise ConfigError(f"{source}: serving.batching.allowed_batch_sizes: the last entry must equal "
                          f"serving.batching.max_batch_size ({sizes[-1]} != {b.max_batch_size})")
    m = serving.monitoring
    if m.monitoring_config_file and (m.enabled or m.path != MonitoringConfig().path):
        key = "enabled" if m.enabled else "path"
        raise ConfigError(f"{source}: serving.monitoring.{key}: must keep its default when "
                          "serving.monitoring.monitoring_config_file is set (the file decides)")
    if not m.path.startswith("/") or m.path.startswith("/v1/"):
        raise ConfigError(f"{source}: serving.monitoring.path: must start with / and not with /v1/, got {m.path!r}")


@dataclasses.dataclass
class Config:
    """A whole run configuration."""

    demo_data: DemoDataConfig = dataclasses.field(default_factory=DemoDataConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)


# --------------------------------------------------------------------------
# Loading and validation.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks `value` against the annotation `tp`, converting ints to floats."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        # NaN passes every min/max comparison, so it is refused here, with infinity and with integers too large
        # for a float (math.isfinite and float() raise OverflowError on those).
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, int) and abs(value) > sys.float_info.max) or not math.isfinite(value)):
            fail("a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # a date given as data, not YAML (which keeps it as text)
            return value.isoformat()
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin in (list, List, Sequence):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail(f"a list of {_type_name(item_tp)}")
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            fail(f"a mapping of {_type_name(key_tp)} to {_type_name(value_tp)}")
        return {
            _convert(k, key_tp, f"{key} (a key)", source): _convert(v, value_tp, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if origin is typing.Union and type(None) in typing.get_args(tp):
        if value is None:
            return None
        (inner,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return _convert(value, inner, key, source)
    raise TypeError(f"config field {key} has an unsupported type {tp}")


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str, source: str) -> None:
    """Applies a field's `choices` / `min` / `max` to a value, or to each item of a list or dict."""
    if isinstance(value, dict):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(key, value)]
    for item_key, v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{source}: {item_key}: expected one of {meta['choices']}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("min") is not None and v < meta["min"]:
                raise ConfigError(f"{source}: {item_key}: must be >= {meta['min']}, got {v!r}")
            if meta.get("max") is not None and v > meta["max"]:
                raise ConfigError(f"{source}: {item_key}: must be <= {meta['max']}, got {v!r}")


def _build(cls, data: Mapping[str, Any], prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}.{name}" if prefix else str(name)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: {where}: unknown key (known keys: {known})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key, source)
        _check_bounds(converted, fields[name].metadata, key, source)
        kwargs[name] = converted
    return cls(**kwargs)


def parse_day(text: str) -> datetime.date:
    """A YYYY-MM-DD day (pipeline.as_of, `clicklens update --as-of`); ValueError otherwise."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"expected a day as YYYY-MM-DD, got {text!r}")
    return datetime.date.fromisoformat(text)


def _daily_loop_checks(config: Config, source: str) -> None:
    """pipeline.as_of / window_days / half_life_days, demo_data.drift_day and training.warm_start."""
    p = config.pipeline
    if p.as_of:
        try:
            parse_day(p.as_of)
        except ValueError as err:
            raise ConfigError(f"{source}: pipeline.as_of: {err}") from None
    if p.vocab_capacity and p.vocab_capacity < len(_RESERVED_TOKENS):
        raise ConfigError(f"{source}: pipeline.vocab_capacity: must be 0 or >= {len(_RESERVED_TOKENS)}")
    d = config.demo_data
    if d.drift_day > d.days:
        raise ConfigError(f"{source}: demo_data.drift_day: must be <= demo_data.days ({d.drift_day} > {d.days})")
    if not config.training.warm_start.strip():
        raise ConfigError(f"{source}: training.warm_start: expected none, latest or a checkpoint path, got ''")


def _cross_checks(config: Config, source: str) -> None:
    """Constraints that span several keys."""
    d = config.demo_data
    if d.min_impressions > d.max_impressions:
        raise ConfigError(
            f"{source}: demo_data.min_impressions: must be <= demo_data.max_impressions "
            f"({d.min_impressions} > {d.max_impressions})"
        )
    if config.pipeline.image_source == "features" and config.pipeline.feature_dim < 1:
        raise ConfigError(f"{source}: pipeline.feature_dim: must be >= 1 when pipeline.image_source is 'features'")
    if config.pipeline.content_graph.source == "features" and config.pipeline.image_source != "features":
        raise ConfigError(f"{source}: pipeline.content_graph.source: 'features' needs pipeline.image_source 'features' "
                          f"(and pipeline.feature_dim >= 1), got image_source '{config.pipeline.image_source}'")
    if (config.model.image_tower == "features") != (config.pipeline.image_source == "features"):
        raise ConfigError(
            f"{source}: model.image_tower: '{config.model.image_tower}' does not fit "
            f"pipeline.image_source '{config.pipeline.image_source}' (use 'features' for both or for neither)"
        )
    s = config.export.scann
    if s.num_leaves and s.num_leaves_to_search and s.num_leaves_to_search > s.num_leaves:
        raise ConfigError(f"{source}: export.scann.num_leaves_to_search: must be <= export.scann.num_leaves "
                          f"({s.num_leaves_to_search} > {s.num_leaves})")
    for key in ("dimensions_per_block", "num_reordering_candidates"):
        if s.quantization == "none" and getattr(s, key) is not None:
            raise ConfigError(f"{source}: export.scann.{key}: applies only with export.scann.quantization "
                              "ah or auto, not none")
    if s.num_reordering_candidates and s.num_reordering_candidates < config.export.k:
        raise ConfigError(f"{source}: export.scann.num_reordering_candidates: must be >= export.k "
                          f"({s.num_reordering_candidates} < {config.export.k}), or 0 for no re-scoring")
    t = config.training
    if t.graph_neighbor_table_steps and not (t.image_table and config.pipeline.image_source == "pixels"):
        raise ConfigError(f"{source}: training.graph_neighbor_table_steps: needs training.image_table true and "
                          f"pipeline.image_source 'pixels' (the table embeds the corpus image table), got "
                          f"image_table {t.image_table}, image_source '{config.pipeline.image_source}'")
    _daily_loop_checks(config, source)
    if config.model.query_tower == "transformer" and config.model.token_embedding_dim % config.model.transformer_heads:
        raise ConfigError(f"{source}: model.transformer_heads: must divide model.token_embedding_dim")
    _serving_checks(config.serving, source)


class _ConfigLoader(yaml.SafeLoader):
    """YAML as the config reads it: an unquoted 2026-01-05 stays text, so a day that does not exist
    (2026-02-30) is refused by the key it was given for, not by the YAML parser."""


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def parse_override(text: str) -> tuple[List[str], Any]:
    """Splits `section.key=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text}: expected section.key=value")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer beyond Python's 4,300 digits
        raise ConfigError(f"--set {key}: value is not valid YAML: {err}") from None
    return path, value


def config_from_dict(data: Optional[Mapping[str, Any]], source: str = "<dict>",
                     overrides: Sequence[str] = ()) -> Config:
    """Builds and validates a Config from plain data plus `--set` overrides."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    data = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
        node[path[-1]] = value
    config = _build(Config, data, "", source)
    _cross_checks(config, source)
    return config


def load_config(path: str = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML run config (local or any TF filesystem path) and validates it; the default path falls back
    to the packaged copy when run from outside the repository."""
    if path == DEFAULT_CONFIG and not os.path.exists(path) and os.path.exists(PACKAGED_DEFAULT_CONFIG):
        path = PACKAGED_DEFAULT_CONFIG
    try:
        text = _read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    try:
        data = _load_yaml(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer beyond Python's 4,300 digits
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(data, source=path, overrides=overrides)


def _read_text(path: str) -> str:
    if "://" in path:
        from clicklens import compat  # noqa: F401  (TF must be set up before import)
        import tensorflow as tf  # only for remote paths: `clicklens --help` must not pay for TensorFlow

        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(path)
        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------
# Describing a config (`clicklens config`).


def _describe_field(field: dataclasses.Field, tp: Any) -> str:
    meta = field.metadata
    parts = [_type_name(tp)]
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    if meta.get("min") is not None:
        parts.append(f">= {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']}")
    return "; ".join(parts) + (f". {meta['help']}" if meta.get("help") else "")


def describe_config(config: Config) -> str:
    """Every section and key as YAML, each key commented with its type, bounds and help."""
    lines: List[str] = []

    def walk(obj, indent: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{field.name}:")
                walk(value, indent + "  ")
                continue
            rendered = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
            rendered = rendered.removesuffix("\n...").strip()
            lines.append(f"{indent}{field.name}: {rendered}  # {_describe_field(field, hints[field.name])}")

    for section in dataclasses.fields(config):
        lines.append(f"{section.name}:  # {type(getattr(config, section.name)).__doc__.strip()}")
        walk(getattr(config, section.name), "  ")
    return "\n".join(lines) + "\n"
