"""Prometheus metrics for `GET /metrics`, named as vLLM names them (prefix `batchdeck:`, or `vllm:`
with `--metrics-prefix vllm` so an existing vLLM dashboard works unchanged), plus batchdeck's own.

Fed from the telemetry the engine already emits, never by polling engine state: the engine thread
only appends its records to a bus subscription (O(1) under a short lock); the server's event loop
drains it every `drain_interval_s` and just before each scrape, and updates the collectors there.
Inter-token gaps come from `AsyncEngine.finished_observers` (each finished request's token times),
since a RequestRecord carries only their summary.

Every series carries `model_name` (as vLLM's do). vLLM's names, one for one:
  gauges      num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1)
  counters    prompt_tokens_total, generation_tokens_total, num_preemptions_total,
              request_success_total{finished_reason}, prefix_cache_queries_total, prefix_cache_hits_total
  histograms  time_to_first_token_seconds, inter_token_latency_seconds, e2e_request_latency_seconds,
              request_queue_time_seconds, request_time_per_output_token_seconds,
              request_inference_time_seconds, request_prefill_time_seconds, request_decode_time_seconds
              (first scheduled -> last token, -> first token, first -> last token; requests that got a
              first token), request_prompt_tokens, request_generation_tokens,
              request_params_max_tokens, iteration_tokens_total
Not exported: vLLM's request_params_n and request_max_num_generation_tokens (per parent request of n
choices: an engine request here is one choice).
batchdeck's own:
  iteration_tokens_by_kind{kind=prefill|decode|padding} (histogram: tokens per iteration by kind),
  policy_info{policy} (1 for the live policy), config_version, iterations_total,
  gpu_memory_used_bytes / gpu_memory_total_bytes / gpu_kv_pool_bytes (the NVML sampler),
  slo_requests_total{slo_class} and slo_met_total{slo_class} (attainment = met / requests),
  slo_attainment_ratio{slo_class}, tenant_service_tokens_total{tenant} (prompt + output tokens
  computed per tenant; at most MAX_TENANT_LABELS distinct tenants, the rest count as "other").
"""
from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the route

from batchdeck.engine.request import SLO_CLASSES, Request
from batchdeck.engine.service.protocol import METRICS_TOPICS
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord

PREFIXES = ("batchdeck", "vllm")
MAX_TENANT_LABELS = 100

# vLLM's bucket boundaries
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class BulkHistogram:
    """A histogram fed many values at once (every inter-token gap of a finished request, one per
    streamed token): counts per bucket in a list, exposed by a collector, at a fraction of the cost
    of one prometheus_client Histogram.observe per value."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...],
                 registry: CollectorRegistry):
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = list(buckets)
        self._series: dict[tuple[str, ...], list] = {}  # label values -> [counts per bucket (+Inf last), sum]
        registry.register(self)

    def series(self, *label_values: str) -> list:
        return self._series.setdefault(label_values, [[0] * (len(self.bounds) + 1), 0.0])

    def observe_many(self, label_values: tuple[str, ...], values: Iterable[float]) -> None:
        series = self.series(*label_values)
        counts, bounds = series[0], self.bounds
        total = 0.0
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # the first bucket whose upper bound is >= v
            total += v
        series[1] += total

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labels)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for label_values, (counts, total) in self._series.items():
            cumulative, buckets = 0, []
            for bound, n in zip([*self.bounds, float("inf")], counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(label_values), buckets, total)
        yield family


class ServerMetrics:
    """The collectors of one server, in their own registry (several servers may share a process)."""

    def __init__(self, model_name: str, prefix: str = "batchdeck", *, policy: str = "", config_version: int = 0):
        if prefix not in PREFIXES:
            raise ValueError(f"--metrics-prefix must be one of {', '.join(PREFIXES)}, got {prefix!r}")
        self.prefix = prefix
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._sub: Any = None
        self._task: asyncio.Task | None = None
        self._tenants: set[str] = set()
        self._policy = ""
        self._slo = {c: [0, 0] for c in SLO_CLASSES}  # class -> [requests, met]
        m = ["model_name"]

        def name(n: str) -> str:
            return f"{prefix}:{n}"

        def gauge(n: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name(n), doc, [*m, *labels], registry=self.registry)

        def counter(n: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name(n), doc, [*m, *labels], registry=self.registry)

        def histogram(n: str, doc: str, buckets: tuple, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name(n), doc, [*m, *labels], buckets=buckets, registry=self.registry)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV cache usage (1 = every block in use)")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens computed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.num_preemptions = counter("num_preemptions", "Preemptions (a running request sent back to wait)")
        self.request_success = counter("request_success", "Finished requests by finish reason",
                                       ("finished_reason",))
        # prefix caching: fed from IterationRecord.prefix_cache_queries / prefix_cache_hits (tokens)
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = BulkHistogram(name("inter_token_latency_seconds"), "Every gap between consecutive output tokens",
                                 ITL_BUCKETS, tuple(m), self.registry)
        self.tpot = histogram("request_time_per_output_token_seconds", "Mean gap after the first token, per request",
                              ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled",
                                    REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduled to last token",
                                        REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token",
                                     REQUEST_LATENCY_BUCKETS)
        self.max_tokens_param = histogram("request_params_max_tokens", "The max_tokens of each request", TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Output tokens per request",
                                                   TOKEN_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per iteration",
                                          ITERATION_TOKEN_BUCKETS)
        # batchdeck's own
        self.iteration_tokens_by_kind = histogram("iteration_tokens_by_kind", "Tokens per iteration by kind",
                                                  ITERATION_TOKEN_BUCKETS, ("kind",))
        self.iterations = counter("iterations", "Engine iterations")
        self.policy_info = gauge("policy_info", "1 for the live scheduling policy", ("policy",))
        self.config_version = gauge("config_version", "Version of the live config (bumped by every change)")
        self.gpu_memory_used = gauge("gpu_memory_used_bytes", "GPU memory in use (NVML)")
        self.gpu_memory_total = gauge("gpu_memory_total_bytes", "GPU memory in total (NVML)")
        self.gpu_kv_pool = gauge("gpu_kv_pool_bytes", "Bytes of the paged KV pool")
        self.slo_requests = counter("slo_requests", "Finished requests per SLO class", ("slo_class",))
        self.slo_met = counter("slo_met", "Finished requests that met their class's SLO", ("slo_class",))
        self.slo_attainment = gauge("slo_attainment_ratio", "SLO attainment per class since start", ("slo_class",))
        self.tenant_tokens = counter("tenant_service_tokens", "Tokens computed per tenant (prompt + output)",
                                     ("tenant",))
        self._m = model_name
        self.itl.series(model_name)
        # every series exists from the start (at 0), so dashboards and rate() see it before the first event
        for collector in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                          self.prompt_tokens, self.generation_tokens, self.num_preemptions, self.prefix_cache_queries,
                          self.prefix_cache_hits, self.ttft, self.tpot, self.e2e, self.queue_time,
                          self.inference_time, self.prefill_time, self.decode_time, self.max_tokens_param,
                          self.request_prompt_tokens, self.request_generation_tokens, self.iteration_tokens,
                          self.iterations, self.config_version):
            collector.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        for cls in SLO_CLASSES:
            self.slo_requests.labels(model_name, cls)
            self.slo_met.labels(model_name, cls)
        for kind in ("prefill", "decode", "padding"):
            self.iteration_tokens_by_kind.labels(model_name, kind)
        self.set_policy(policy)
        self.config_version.labels(model_name).set(config_version)
        # the series every iteration record updates, looked up once (labels() costs a lock and a dict)
        m0 = model_name
        self._children = {
            "running": self.num_requests_running.labels(m0), "waiting": self.num_requests_waiting.labels(m0),
            "kv": self.kv_cache_usage_perc.labels(m0), "prompt": self.prompt_tokens.labels(m0),
            "generation": self.generation_tokens.labels(m0), "preemptions": self.num_preemptions.labels(m0),
            "iterations": self.iterations.labels(m0), "iteration_tokens": self.iteration_tokens.labels(m0),
            "prefill": self.iteration_tokens_by_kind.labels(m0, "prefill"),
            "decode": self.iteration_tokens_by_kind.labels(m0, "decode"),
            "padding": self.iteration_tokens_by_kind.labels(m0, "padding"),
            "config_version": self.config_version.labels(m0), "ttft": self.ttft.labels(m0)}

    # -- feeding -------------------------------------------------------------------------------
    def start(self, bus: Any, engine: Any = None, drain_interval_s: float = 0.5) -> None:
        """Subscribe to `bus` on the running loop (and to `engine`'s finished requests)."""
        self._sub = bus.subscribe(METRICS_TOPICS, maxsize=65536, name="prometheus")
        if engine is not None:
            engine.finished_observers.append(self.observe_finished)
        self._task = asyncio.get_running_loop().create_task(self._drain_loop(drain_interval_s))

    async def _drain_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.drain()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sub is not None:
            self._sub.close()

    def drain(self) -> None:
        if self._sub is None:
            return
        for msg in self._sub.drain():
            self.observe(msg.topic, msg.record)

    def render(self) -> bytes:
        """The exposition text, with everything published so far applied."""
        self.drain()
        return generate_latest(self.registry)

    def observe(self, topic: str, record: Any) -> None:
        if topic == "iteration":
            self._iteration(record)
        elif topic == "request":
            self._request(record)
        elif topic == "event":
            self._event(record)
        elif topic == "gpu":
            self._gpu(record)
        elif topic == "requests":  # the queue changed without an iteration (an abort while idle, say)
            self._children["running"].set(record["num_running"])
            self._children["waiting"].set(record["num_waiting"])
            self._children["kv"].set(record["kv_cache_usage"])

    def _iteration(self, it: IterationRecord) -> None:
        c = self._children
        c["running"].set(it.num_requests_running)
        c["waiting"].set(it.num_requests_waiting)
        c["kv"].set(it.kv_cache_usage)
        c["prompt"].inc(it.num_prefill_tokens)
        c["generation"].inc(it.num_generated_tokens)
        if it.num_preemptions:
            c["preemptions"].inc(it.num_preemptions)
        c["iterations"].inc()
        c["iteration_tokens"].observe(it.num_prefill_tokens + it.num_decode_tokens)
        c["prefill"].observe(it.num_prefill_tokens)
        c["decode"].observe(it.num_decode_tokens)
        c["padding"].observe(it.num_padding_tokens)
        c["config_version"].set(it.config_version)
        if it.ttfts:
            ttft = c["ttft"]
            for value in it.ttfts:
                ttft.observe(value)
        for tenant, tokens in it.tenant_tokens.items():
            self.tenant_tokens.labels(self._m, self._tenant_label(tenant)).inc(tokens)
        self._observe_prefix_cache(it)

    def _observe_prefix_cache(self, it: IterationRecord) -> None:
        """Prefix caching's counters, from the iteration record's prefix_cache_queries / _hits fields
        (prompt tokens looked up at admission / served from the cache, this iteration)."""
        if it.prefix_cache_queries:
            self.prefix_cache_queries.labels(self._m).inc(it.prefix_cache_queries)
            self.prefix_cache_hits.labels(self._m).inc(it.prefix_cache_hits)

    def _request(self, r: RequestRecord) -> None:
        m = self._m
        self.request_success.labels(m, r.finish_reason).inc()
        self.e2e.labels(m).observe(r.e2e_latency)
        self.queue_time.labels(m).observe(r.queue_time)
        if r.ttft is not None:  # vLLM's phases: queued | prefill (scheduled -> first token) | decode
            self.prefill_time.labels(m).observe(max(0.0, r.ttft - r.queue_time))
            self.decode_time.labels(m).observe(max(0.0, r.e2e_latency - r.ttft))
            self.inference_time.labels(m).observe(max(0.0, r.e2e_latency - r.queue_time))
        if r.max_tokens:
            self.max_tokens_param.labels(m).observe(r.max_tokens)
        self.request_prompt_tokens.labels(m).observe(r.prompt_tokens)
        self.request_generation_tokens.labels(m).observe(r.output_tokens)
        if r.tpot is not None:
            self.tpot.labels(m).observe(r.tpot)
        if r.finish_reason != "abort" and r.slo_class in self._slo:
            counts = self._slo[r.slo_class]
            counts[0] += 1
            counts[1] += bool(r.slo_met)
            self.slo_requests.labels(m, r.slo_class).inc()
            if r.slo_met:
                self.slo_met.labels(m, r.slo_class).inc()
            self.slo_attainment.labels(m, r.slo_class).set(counts[1] / counts[0])

    def _event(self, e: Event) -> None:
        if e.kind == "config_change":
            if "policy" in (e.data.get("changes") or {}):
                self.set_policy(str(e.data["changes"]["policy"]))
            if e.data.get("version") is not None:
                self.config_version.labels(self._m).set(e.data["version"])

    def _gpu(self, sample: Any) -> None:
        if not getattr(sample, "available", False):
            return
        m = self._m
        if sample.memory_used is not None:
            self.gpu_memory_used.labels(m).set(sample.memory_used)
        if sample.memory_total is not None:
            self.gpu_memory_total.labels(m).set(sample.memory_total)
        self.gpu_kv_pool.labels(m).set(sample.kv_pool_bytes)

    def observe_finished(self, r: Request) -> None:
        """Every inter-token gap of a finished request (called on the loop by AsyncEngine)."""
        times = r.token_times
        if len(times) > 1:
            self.itl.observe_many((self._m,), [b - a for a, b in zip(times, times[1:])])

    def set_policy(self, policy: str) -> None:
        if self._policy:
            self.policy_info.labels(self._m, self._policy).set(0)
        self._policy = policy
        if policy:
            self.policy_info.labels(self._m, policy).set(1)

    def _tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return "other"
        self._tenants.add(tenant)
        return tenant
