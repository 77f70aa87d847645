"""TF Serving's Prometheus metrics: the same names, labels, buckets and text format as tensorflow_model_server.

TF Serving names its metrics `/tensorflow/serving/...` and its Prometheus
exporter (tensorflow_serving/util/prometheus_exporter.cc) turns every other
character into `:`, so they are scraped as `:tensorflow:serving:...`.  The
colon-prefixed names and TF Serving's un-suffixed counters (no `_total`) are
why the page is written here rather than by prometheus_client's registry.

Recording takes one short lock per observation; a scrape copies the figures
under that lock and formats them outside it, so a scrape (even a slow or stuck
scraper) never holds up a request.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import threading
from typing import Dict, List, Tuple

import grpc

from clicklens.errors import ClicklensError
from serving.tf_serving_protos import MonitoringConfig, read_text_proto

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUNTIME = "TF2"  # the runtime label: signatures run as TF2 functions here (TF Serving says TF1 or TFRT)


def exponential_buckets(scale: float, growth: float, count: int) -> Tuple[float, ...]:
    """TF's monitoring::Buckets::Exponential upper limits (the +Inf bucket is implicit)."""
    return tuple(scale * growth ** i for i in range(count))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: it keys a dict on every observation
class Metric:
    """One TF Serving metric: its TF name, help text, kind, label names and (histograms) bucket limits."""

    name: str
    help: str
    kind: str  # "counter" or "histogram"
    labels: Tuple[str, ...] = ()
    buckets: Tuple[float, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The name as TF Serving's exporter prints it: /tensorflow/serving/x -> :tensorflow:serving:x."""
        return re.sub(r"[^a-zA-Z0-9_]", ":", self.name)


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)  # microseconds, up to ~20 minutes
BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)

# tensorflow_serving/servables/tensorflow/util.cc
REQUEST_COUNT = Metric("/tensorflow/serving/request_count", "The total number of requests.", "counter",
                       ("model_name", "status"))
REQUEST_LATENCY = Metric("/tensorflow/serving/request_latency",
                         "Distribution of wall time (in microseconds) for Tensorflow Serving request.", "histogram",
                         ("model_name", "API", "entrypoint"), LATENCY_BUCKETS)
RUNTIME_LATENCY = Metric("/tensorflow/serving/runtime_latency",
                         "Distribution of wall time (in microseconds) for Tensorflow runtime.", "histogram",
                         ("model_name", "API", "runtime"), LATENCY_BUCKETS)
# tensorflow_serving/batching/batching_session.cc and batching_util.h
QUEUING_LATENCY = Metric("/tensorflow/serving/batching_session/queuing_latency",
                         "Distribution of wall time spent (in microseconds) in queuing", "histogram",
                         ("thread_pool_name",), exponential_buckets(100, 1.2, 52))
WRAPPED_RUN_COUNT = Metric("/tensorflow/serving/batching_session/wrapped_run_count",
                           "Total count of run calls on the wrapped session", "counter")
INPUT_BATCH_SIZE = Metric("/tensorflow/serving/batching_session/input_batch_size",
                          "Tracks the batch size distribution on the inputs.", "histogram", (), BATCH_SIZE_BUCKETS)
PROCESSED_BATCH_SIZE = Metric("/tensorflow/serving/batching_session/processed_batch_size",
                              "Tracks the batch size distribution on processing.", "histogram", (),
                              BATCH_SIZE_BUCKETS)
PADDING_SIZE = Metric("/tensorflow/serving/batching_session/padding_size",
                      "Tracks the padding size distribution on batches.", "histogram", ("execution_batch_size",),
                      BATCH_SIZE_BUCKETS)
# tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc
MODEL_WARMUP_LATENCY = Metric("/tensorflow/serving/model_warmup_latency",
                              "Distribution of wall time (in microseconds) for warming up the model.", "histogram",
                              ("model_path", "status"), LATENCY_BUCKETS)
MODEL_WARMUP_RECORDS_READ = Metric("/tensorflow/serving/model_warmup_records_read",
                                   "Total number of warmup records read during model warmup.", "counter",
                                   ("model_path", "status"))

ALL = (REQUEST_COUNT, REQUEST_LATENCY, RUNTIME_LATENCY, QUEUING_LATENCY, WRAPPED_RUN_COUNT, INPUT_BATCH_SIZE,
       PROCESSED_BATCH_SIZE, PADDING_SIZE, MODEL_WARMUP_LATENCY, MODEL_WARMUP_RECORDS_READ)


def _micros(seconds: float) -> int:
    return max(int(seconds * 1e6), 0)


class Metrics:
    """The server's metrics; every record method is a no-op when monitoring is off."""

    def __init__(self, enabled: bool = False, path: str = DEFAULT_PATH):
        self.enabled = enabled
        self.path = path
        self._lock = threading.Lock()
        self._counters: Dict[Metric, Dict[Tuple[str, ...], int]] = {m: {} for m in ALL if m.kind == "counter"}
        # histogram series: [per-bucket counts (the last is +Inf), sum]
        self._histograms: Dict[Metric, Dict[Tuple[str, ...], list]] = {m: {} for m in ALL if m.kind == "histogram"}

    # -- recording -------------------------------------------------------------

    def count(self, metric: Metric, labels: Tuple[str, ...] = (), n: int = 1) -> None:
        """Adds n to a counter series."""
        if not self.enabled:
            return
        with self._lock:
            series = self._counters[metric]
            series[labels] = series.get(labels, 0) + n

    def observe(self, metric: Metric, labels: Tuple[str, ...], value: float) -> None:
        """Adds one value to a histogram series (TF's buckets: a value equal to a limit falls in the next one)."""
        if not self.enabled:
            return
        index = bisect.bisect_right(metric.buckets, value)
        with self._lock:
            series = self._histograms[metric]
            entry = series.get(labels)
            if entry is None:
                entry = series[labels] = [[0] * (len(metric.buckets) + 1), 0.0]
            entry[0][index] += 1
            entry[1] += value

    def request(self, model_name: str, api: str, entrypoint: str, code: grpc.StatusCode, seconds: float) -> None:
        """One finished request: request_count by status, and request_latency when it succeeded (as TF Serving)."""
        self.count(REQUEST_COUNT, (model_name, code.name))
        if code == grpc.StatusCode.OK:
            self.observe(REQUEST_LATENCY, (model_name, api, entrypoint), _micros(seconds))

    def runtime(self, model_name: str, api: str, seconds: float) -> None:
        """The time a request spent in the model (queued for a batch included, as TF Serving's BatchingSession)."""
        self.observe(RUNTIME_LATENCY, (model_name, api, RUNTIME), _micros(seconds))

    def queued(self, thread_pool_name: str, seconds: float, rows: int) -> None:
        """One request taken from a batching queue after `seconds`, carrying `rows` rows."""
        self.observe(QUEUING_LATENCY, (thread_pool_name,), _micros(seconds))
        self.observe(INPUT_BATCH_SIZE, (), rows)

    def batch(self, execution_batch_size: int, padding: int) -> None:
        """One merged call on the model of `execution_batch_size` rows, `padding` of them padding."""
        self.count(WRAPPED_RUN_COUNT)
        self.observe(PROCESSED_BATCH_SIZE, (), execution_batch_size)
        self.observe(PADDING_SIZE, (str(execution_batch_size),), padding)

    def warmup(self, model_path: str, code: grpc.StatusCode, seconds: float, records: int) -> None:
        """A version's warmup replay: its latency and the records it read, by outcome."""
        self.observe(MODEL_WARMUP_LATENCY, (model_path, code.name), _micros(seconds))
        self.count(MODEL_WARMUP_RECORDS_READ, (model_path, code.name), records)

    # -- the page --------------------------------------------------------------

    def exposition(self) -> str:
        """The Prometheus text page: the figures are copied under the lock and formatted after it is released."""
        with self._lock:
            counters = {m: dict(series) for m, series in self._counters.items()}
            histograms = {m: {k: (list(v[0]), v[1]) for k, v in series.items()}
                          for m, series in self._histograms.items()}
        lines: List[str] = []
        for metric in sorted(ALL, key=lambda m: m.name):  # TF Serving prints them sorted by name
            name = metric.prometheus_name
            lines.append(f"# HELP {name} {metric.help}")
            lines.append(f"# TYPE {name} {metric.kind}")
            if metric.kind == "counter":
                for labels, value in sorted(counters[metric].items()):
                    lines.append(f"{name}{{{_labels(metric.labels, labels)}}} {value}")
                continue
            for labels, (buckets, total) in sorted(histograms[metric].items()):
                base = _labels(metric.labels, labels)
                prefix = f"{name}_bucket{{{base}{',' if base else ''}"
                cumulative = 0
                for i, count in enumerate(buckets):
                    cumulative += count
                    limit = _number(metric.buckets[i]) if i < len(metric.buckets) else "+Inf"
                    lines.append(f'{prefix}le="{limit}"}} {cumulative}')
                lines.append(f"{name}_sum{{{base}}} {total!r}")
                lines.append(f"{name}_count{{{base}}} {cumulative}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A bucket limit as TF Serving prints it (absl::StrCat of a double: 6 significant digits)."""
    return f"{value:.6g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Tuple[str, ...], values: Tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))


def from_config(monitoring) -> Metrics:
    """Metrics for serving.monitoring: its own keys, or a TF Serving monitoring_config_file (which then decides)."""
    if not monitoring.monitoring_config_file:
        return Metrics(monitoring.enabled, monitoring.path)
    path = monitoring.monitoring_config_file
    prometheus = read_text_proto(path, MonitoringConfig).prometheus_config
    page = prometheus.path or DEFAULT_PATH
    if not page.startswith("/") or page.startswith("/v1/"):
        raise ClicklensError(f"{path}: prometheus_config.path: must start with / and not with /v1/, got {page!r}")
    return Metrics(prometheus.enable, page)
