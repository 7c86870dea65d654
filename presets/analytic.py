"""The seed's analytic model beside what was measured or simulated (pure functions of a report).

Throughput bound of continuous batching, from a profile's cost model (engine/sim/cost_model.py):
with B running requests (B = min(max_num_seqs, KV pool tokens / (P + O))), mean prompt P and output O
tokens, a decode iteration of B rows at mean context P + O/2 takes T_dec(B) (the decode regime:
c_const + c_rows*B + c_pad*bucket(B) + c_ctx*B*(P + O/2)/1000), and each request's prefill adds
T_pre (the mixed regime's cost of a P-token chunk beyond its constant: c_tok*P + c_att*P(P+1)/2e6 + ...).
Tokens per iteration / iteration time, with prefill amortised per request:

    X_max = O / (O * T_dec(B) / B + T_pre)   output tokens/s;   request rate bound = X_max / O

M/G/1 estimate of SLO attainment (the seed's argument): arrival rate lambda (requests / arrival span),
service time S = e2e latency - queue time per request, rho = lambda * E[S]; for a target T with
E[S] < T and rho < 1:  P(response <= T) >= 1 - rho^(T / E[S]).  T is the class's e2e target
ttft + tpot * (mean output - 1) (engine/slo.py). With batching the engine serves many requests at
once, so rho = lambda*E[S] can exceed 1 while the engine keeps up: that is where the single-server
model stops describing a batching engine; `utilization_vs_bound` = lambda * O / X_max is the share of
the throughput bound in use.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from batchdeck.engine.sim.cost_model import CostModel
from batchdeck.engine.slo import DEFAULT_SLO_TARGETS


def throughput_bound(cost: Mapping[str, float], *, max_num_seqs: int, pool_tokens: int, mean_prompt: float,
                     mean_output: float) -> dict[str, Any]:
    """X_max (output tokens/s) and the request-rate bound for a workload's mean lengths."""
    p, o = max(0.0, mean_prompt), max(1.0, mean_output)
    b = max(1, min(int(max_num_seqs), int(pool_tokens // max(1.0, p + o))))
    model = CostModel(dict(cost))
    t_dec = model.decode_iteration_seconds(b, p + o / 2)
    t_pre = model.prefill_seconds(p)
    per_request = o * t_dec / b + t_pre
    x_max = o / per_request if per_request > 0 else math.inf
    return {"running": b, "decode_iteration_s": t_dec, "prefill_per_request_s": t_pre,
            "output_tokens_per_s": x_max, "requests_per_s": x_max / o}


def mg1_estimate(requests: Sequence[Mapping[str, Any]], target_s: float) -> dict[str, Any]:
    """lambda, E[S], E[S^2], rho and the M/G/1 bound 1 - rho^(T/E[S]) beside the measured P(e2e <= T)."""
    done = [r for r in requests if r.get("e2e_latency") is not None and r.get("finish_reason") not in ("abort", "rejected")]
    if len(done) < 2:
        return {"applicable": False, "reason": "fewer than 2 finished requests"}
    arrivals = sorted(r["arrival"] for r in done)
    span = arrivals[-1] - arrivals[0]
    lam = (len(done) - 1) / span if span > 0 else math.inf
    service = [max(0.0, r["e2e_latency"] - (r.get("queue_time") or 0.0)) for r in done]
    es = sum(service) / len(service)
    es2 = sum(s * s for s in service) / len(service)
    rho = lam * es
    measured = sum(1 for r in done if r["e2e_latency"] <= target_s) / len(done)
    out = {"target_s": target_s, "arrival_rate": lam, "mean_service_s": es, "service_second_moment": es2,
           "rho": rho, "measured_attainment": measured}
    if not (rho < 1 and 0 < es < target_s):
        why = "rho >= 1 (a batching engine serves many at once)" if rho >= 1 else "E[S] >= T"
        return {**out, "applicable": False, "reason": why, "estimate": None, "mean_wait_s": None}
    return {**out, "applicable": True, "estimate": 1 - rho ** (target_s / es),
            "mean_wait_s": lam * es2 / (2 * (1 - rho))}  # Pollaczek-Khinchine


def e2e_target(slo_class: str, mean_output: float) -> float:
    t = DEFAULT_SLO_TARGETS.get(slo_class, DEFAULT_SLO_TARGETS["interactive"])
    return t.ttft + t.tpot * max(0.0, mean_output - 1)


def analytic_summary(report: Mapping[str, Any], cost: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The analytic section of a report (replay, sweep, bench): the throughput bound (needs a cost
    model: a simulated run's, or a profile's for a GPU run) and the M/G/1 estimate, beside measurements."""
    rows = [r for r in report.get("requests") or [] if not r.get("error")]
    if not rows:
        return {"applicable": False, "reason": "no requests"}
    mean_p = sum(r.get("prompt_tokens") or 0 for r in rows) / len(rows)
    mean_o = sum(r.get("output_tokens") or 0 for r in rows) / len(rows)
    classes: dict[str, int] = {}
    for r in rows:
        classes[r.get("slo_class") or "interactive"] = classes.get(r.get("slo_class") or "interactive", 0) + 1
    main_class = max(classes, key=classes.get)
    out: dict[str, Any] = {"mean_prompt_tokens": mean_p, "mean_output_tokens": mean_o, "slo_class": main_class,
                           "mg1": mg1_estimate(rows, e2e_target(main_class, mean_o))}
    summary = report.get("summary") or {}
    measured = summary.get("generation_throughput")
    out["measured_output_tokens_per_s"] = measured
    if cost:
        engine = (report.get("run") or {}).get("engine") or {}
        config = (report.get("run") or {}).get("initial_config") or report.get("initial_config") or {}
        pool = (engine.get("num_blocks") or 0) * (engine.get("block_size") or 16)
        bound = throughput_bound(cost, max_num_seqs=config.get("max_num_seqs") or 1, pool_tokens=pool or 1 << 30,
                                 mean_prompt=mean_p, mean_output=mean_o)
        mg = out["mg1"]
        if mg.get("arrival_rate") is not None and math.isfinite(mg["arrival_rate"]):
            bound["utilization_vs_bound"] = mg["arrival_rate"] * mean_o / bound["output_tokens_per_s"]
        if measured:
            bound["measured_share_of_bound"] = measured / bound["output_tokens_per_s"]
        out["throughput_bound"] = bound
    return out


def analytic_lines(a: Mapping[str, Any]) -> list[str]:
    """Plain-text lines for summaries."""
    if not a or a.get("applicable") is False:
        return []
    lines = []
    b = a.get("throughput_bound")
    if b:
        lines.append(f"throughput bound (continuous batching, B={b['running']}): {b['output_tokens_per_s']:,.0f} "
                     f"output tok/s = {b['requests_per_s']:.2f} req/s; measured {a.get('measured_output_tokens_per_s') or 0:,.0f} tok/s"
                     + (f", utilization {b['utilization_vs_bound']:.0%} of the bound" if "utilization_vs_bound" in b else ""))
    m = a["mg1"]
    if "rho" in m:
        est = f"{m['estimate']:.1%}" if m.get("estimate") is not None else f"n/a ({m.get('reason')})"
        lines.append(f"M/G/1: lambda={m['arrival_rate']:.2f}/s E[S]={m['mean_service_s']:.3f}s rho={m['rho']:.2f}; "
                     f"P(e2e <= {m['target_s']:.2f}s) >= {est}; measured {m['measured_attainment']:.1%}")
    return lines
