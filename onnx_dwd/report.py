"""The report: a terminal table, Markdown, and JSON, all from one dict."""

from __future__ import annotations

import json
import math
from typing import Dict, List


def to_json(report: Dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(report), indent=2) + "\n"


def _mega(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _ratio(before, after) -> str:
    return "-" if not before or not after else f"{before / after:.2f}x"


def _num(v, fmt="{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def layer_rows(report: Dict) -> List[List[str]]:
    rows = []
    for e in report["layers"]:
        k = "x".join(str(d) for d in e["kernel"]) or "?"
        chans = f"{e['in_channels'] or '?'}->{e['out_channels'] or '?'}"
        what = f"rank {e['rank']}" + (f" ({e['graph_form']})" if e["rank"] and e["rank"] > 1 else "") \
            if e["decomposed"] else f"kept: {e['reason']}"
        ms = "-" if e.get("latency_before_ms") is None else \
            f"{e['latency_before_ms']:.3f}->{e['latency_after_ms']:.3f}"
        rows.append([e["name"], k, chans, str(e["group"]), _mega(e["macs_before"]), _mega(e["macs_after"]), ms,
                     _num(e["weight_rel_error"], "{:.3f}"), _num(e.get("rel_error"), "{:.3f}"), what])
    return rows


LAYER_HEADER = ["layer", "kernel", "channels", "group", "MACs before", "MACs after", "layer ms", "weight err",
                "output err", "decision"]


def summary_lines(report: Dict) -> List[str]:
    m, v, c = report["model"], report["model"]["validation"], report["config"]
    if c["rank"] is not None:
        ranks = f"rank {c['rank']}"
    else:
        (kind, value), = c["budget"].items()
        ranks = f"rank per layer for {kind.replace('_', ' ')} {value:g}"
        if m.get("selection") and not m["selection"]["met"]:
            ranks += " (NOT MET: see selection.rounds)"
        elif (m.get("selection") or {}).get("met_in_report_measurement") is False:
            ranks += " (met while choosing; the report's own measurement below falls short: timing spread)"
    lines = [
        f"model      {report['input']} -> {report['output']}  (opset {m['opset']})",
        f"convs      {m['decomposed']} of {m['convs']} decomposed; method {c['method']}, {ranks}"
        + (", inter-layer compensation" if report["config"].get("inter_layer") else "")
        + f"; folded into convs: {len(m['folded'])} nodes",
        f"MACs       {_mega(m['macs_before'])} -> {_mega(m['macs_after'])}  ({_ratio(m['macs_before'], m['macs_after'])} fewer)"
        "  [Conv nodes, per image]",
        f"params     {_mega(m['params_before'])} -> {_mega(m['params_after'])}",
        f"validated  on {v['inputs']}",
        "           (output err per layer: |Y - Y_hat| / |Y| on the held-out data; weight err: |W - W_hat| / |W|)",
    ]
    for name, o in v["outputs"].items():
        lines.append(f"  output {name}: rel_error {o['rel_error']:.3g}, max_abs {o['max_abs_error']:.3g}, "
                     f"cosine {o['cosine']:.6f}, SQNR {o['sqnr_db']:.1f} dB")
    if "top1_agreement" in v:
        lines.append(f"  top-1 agreement with the original: {100 * v['top1_agreement']:.2f}%")
    if "accuracy_before" in v:
        lines.append(f"  accuracy vs labels: {100 * v['accuracy_before']:.2f}% -> {100 * v['accuracy_after']:.2f}%")
    lat = m.get("latency")
    if lat:
        lines.append(f"latency    {lat['before_ms']:.3f} ms -> {lat['after_ms']:.3f} ms, speed-up {lat['speedup']:.2f}x "
                     f"[{lat['speedup_iqr'][0]:.2f}-{lat['speedup_iqr'][1]:.2f}] on {lat['runtime_detail']}, "
                     f"{lat['threads']} thread(s)  (median of {lat['blocks']} interleaved blocks [IQR])")
    return lines


def render_table(report: Dict) -> str:
    rows = [LAYER_HEADER] + layer_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(LAYER_HEADER) - 1)]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if j == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    return "\n".join(out + [""] + summary_lines(report)) + "\n"


def render_markdown(report: Dict) -> str:
    out = ["# onnx-dwd report", ""] + [f"    {l}" for l in summary_lines(report)] + [""]
    out.append("| " + " | ".join(LAYER_HEADER) + " |")
    out.append("|" + "---|" * len(LAYER_HEADER))
    for r in layer_rows(report):
        out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return "\n".join(out) + "\n"
