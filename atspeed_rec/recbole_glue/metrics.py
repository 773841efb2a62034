"""Speculative-decoding statistics as RecBole metrics, reported beside Recall and NDCG.

A model that decodes speculatively accumulates its statistics during `full_sort_predict`
(`SpecMeter`); `SpecCollector.model_collect` copies them into RecBole's data struct after the
evaluation loop, and each metric class reads one of them. Under DDP RecBole averages them over
ranks like any other metric. Models that list none of these metrics (the baselines) report none.
"""

from __future__ import annotations

import time

import torch
from recbole.evaluator import register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.evaluator.collector import Collector
from recbole.utils import EvaluatorType


class SpecMeter:
    """Running totals over one evaluation: per-request counts, the two decoders' times on whole
    evaluation batches, and their times on single requests (batch 1, as the paper measures)."""

    def __init__(self):
        self.warmed_up = False  # a first single request was decoded, untimed (once per process)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.spec_requests = 0  # of them, those decoded speculatively (not by the target's own search)
        self.accepted_steps = 0.0  # drafted levels accepted, summed over requests
        self.drafted_levels = 0.0
        self.target_calls = 0.0  # target forward passes, summed over requests
        self.spec_seconds = 0.0  # decoding as served, all batches
        self.timed_batches = 0  # batches also decoded by the target alone, for the speedup
        self.timed_spec_seconds = 0.0  # speculative decoding of those batches
        self.target_seconds = 0.0  # our KV-cached target-only beam search of those batches
        self.single_target_ms: list[float] = []  # requests decoded alone, target-only ...
        self.single_spec_ms: list[float] = []  # ... and speculatively

    def add(self, requests: int, accepted: float, drafted: float, target_calls: float,
            spec_seconds: float, target_seconds: float | None = None, speculative: bool = True) -> None:
        """One batch, as served (`speculative`, or by the target's own search); `target_seconds` when the
        same batch was also decoded by the target's own beam search."""
        self.requests += requests
        self.spec_requests += requests if speculative else 0
        self.accepted_steps += accepted
        self.drafted_levels += drafted
        self.target_calls += target_calls
        self.spec_seconds += spec_seconds
        if target_seconds is not None:
            self.timed_batches += 1
            self.timed_spec_seconds += spec_seconds
            self.target_seconds += target_seconds

    def add_single(self, target_seconds: float, spec_seconds: float) -> None:
        """One request decoded alone both ways."""
        self.single_target_ms.append(1000 * target_seconds)
        self.single_spec_ms.append(1000 * spec_seconds)

    def summary(self) -> dict[str, float]:
        n = max(self.requests, 1)
        single = {}  # batch 1 (test only): absent, so reported as nan, when no request was timed alone
        if self.single_spec_ms:
            target, spec = torch.tensor(self.single_target_ms), torch.tensor(self.single_spec_ms)
            ratio = target / spec  # [requests] each request's own speedup
            single = {"speedup": float(ratio.mean()),  # the paper's measure: per-request ratios averaged
                      "speedup_median": float(ratio.median()),  # robust to a slow outlier, blind to a slow minority
                      "latency_b1_ms": float(spec.median()), "target_latency_b1_ms": float(target.median())}
        return {
            **single,
            "speedup_batch": self.target_seconds / self.timed_spec_seconds if self.timed_spec_seconds else 0.0,
            "accepted_steps": self.accepted_steps / max(self.spec_requests, 1),
            "target_calls": self.target_calls / n,
            "acceptance_rate": self.accepted_steps / self.drafted_levels if self.drafted_levels else 0.0,
            "latency_ms": 1000 * self.spec_seconds / n,
        }


class SpecCollector(Collector):
    """RecBole's Collector, plus the model's `spec_meter` summary (a no-op for other models)."""

    def model_collect(self, model: torch.nn.Module):
        meter = getattr(model, "spec_meter", None)
        if meter is None or meter.requests == 0:
            return
        for name, value in meter.summary().items():
            self.data_struct.set(f"spec.{name}", torch.tensor(value))
        meter.reset()


def _spec_metric(name: str, doc: str, smaller: bool) -> type:
    def calculate_metric(self, dataobject):
        key = f"spec.{name}"
        value = float(dataobject.get(key)) if key in dataobject._data_dict else float("nan")
        return {name: round(value, self.decimal_place)}

    return type(name, (AbstractMetric,), {
        "__doc__": doc, "metric_type": EvaluatorType.RANKING, "metric_need": [],
        "smaller": smaller, "calculate_metric": calculate_metric,
    })


SPEC_METRICS = {
    "speedup": _spec_metric("speedup", "mean over single requests (batch 1) of target-only beam search time / "
                            "speculative time (the paper's measure)", False),
    "speedup_median": _spec_metric("speedup_median", "median of the same per-request ratios", False),
    "latency_b1_ms": _spec_metric("latency_b1_ms", "median speculative time of a single request (ms)", True),
    "target_latency_b1_ms": _spec_metric("target_latency_b1_ms", "median target-only time of a single request (ms)",
                                         True),
    "speedup_batch": _spec_metric("speedup_batch", "target-only / speculative time on whole evaluation batches",
                                  False),
    "accepted_steps": _spec_metric("accepted_steps", "drafted levels accepted per request decoded speculatively",
                                   False),
    "target_calls": _spec_metric("target_calls", "target forward passes per request", True),
    "acceptance_rate": _spec_metric("acceptance_rate", "accepted / drafted levels", False),
    "latency_ms": _spec_metric("latency_ms", "decoding time per request in evaluation batches, as served (ms)",
                                 True),
}


def register_spec_metrics() -> None:
    """Make the metrics known to RecBole (its registry dicts are shared module objects)."""
    for name, cls in SPEC_METRICS.items():
        register.metrics_dict[name] = cls
        register.metric_information[name] = cls.metric_need
        register.metric_types[name] = cls.metric_type
        if cls.smaller and name not in register.smaller_metrics:
            register.smaller_metrics.append(name)


def timed(fn, device: torch.device):
    """(fn(), seconds), waiting for the device's queued kernels before and after (GPU timing)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start
