"""Benchmark results as a table, a targets verdict, JSON and a PNG chart.

``ratio`` everywhere is a peer's median time per call divided by gru-engine's (``engine``, or
``engine-stream`` for per-step workloads): above 1, gru-engine is faster. For throughput the same
number is gru-engine's items per second over the peer's.
"""

from __future__ import annotations

import dataclasses
import json
import math

from gru_engine.fileio import atomic_write

from .registry import IMPLEMENTATIONS
from .score import format_lines
from .units import format_rate, format_seconds
from .workloads import (AIRLINE_B1, AIRLINE_CHUNKS, AIRLINE_STEP, AIRLINE_THROUGHPUT, CAUSAL_CONV_STEP, GFLOP_CASE,
                        GFLOP_STEPS, GUITAR_B1, LSTM_AIRLINE_B1, LSTM_AIRLINE_STEP, LSTM_AIRLINE_THROUGHPUT,
                        TRANSFORM_CASES, threads_label)

COLD_START_LIMIT_S = 0.5
# Width of the implementation column: the longest registry name.
NAME_WIDTH = max(len(name) for name in IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class RatioTarget:
    """gru-engine must be at least ``minimum`` times faster than ``peer`` on workload ``config``."""

    number: int
    config: str
    peer: str
    minimum: float
    what: str


@dataclasses.dataclass(frozen=True)
class CostTarget:
    """On workload ``config``, ``timed``'s median time is at most ``maximum`` times ``reference``'s."""

    number: int
    config: str
    timed: str
    reference: str
    maximum: float
    what: str


RATIO_TARGETS = (
    RatioTarget(1, AIRLINE_B1, "ort-native", 2.0, "airline batch 1, 1 thread: ort-native / engine"),
    RatioTarget(1, AIRLINE_B1, "ort-tf2onnx", 30.0, "airline batch 1, 1 thread: ort-tf2onnx / engine"),
    RatioTarget(1, AIRLINE_B1, "tf-xla", 30.0, "airline batch 1, 1 thread: tf-xla / engine"),
    RatioTarget(2, AIRLINE_THROUGHPUT, "ort-native", 1.5,
                "airline batch 1024, all cores: engine / ort-native throughput"),
    RatioTarget(3, GFLOP_CASE, "ort-native", 1.5, "H=256 T=1000 batch 1, 1 thread: ort-native / engine"),
    RatioTarget(5, LSTM_AIRLINE_B1, "ort-native", 2.0, "LSTM airline batch 1, 1 thread: ort-native / engine"),
    RatioTarget(6, LSTM_AIRLINE_THROUGHPUT, "ort-native", 1.5,
                "LSTM airline batch 1024, all cores: engine / ort-native throughput"),
    RatioTarget(7, LSTM_AIRLINE_STEP, "ort-native-stream", 4.0,
                "LSTM airline step, 1 thread: ort-native-stream / engine-stream"),
    RatioTarget(10, GUITAR_B1, "ort-native", 2.0, "GuitarLSTM window, 1 thread: ort-native / engine"),
    RatioTarget(10, CAUSAL_CONV_STEP, "ort-native-stream", 2.0,
                "causal Conv1D -> GRU step: ort-native-stream / engine-stream"),
)
# What a bundle's transforms and feeding a stream in small chunks may cost; what share of the engine's
# time a step of the exported C may take.
TRANSFORM_LIMIT, CHUNK_LIMIT, SINGLE_CHUNK_LIMIT = 1.1, 1.25, 1.2
C_STEP_SHARE, C_CHUNK_SHARE = 0.5, 1.0
COST_TARGETS = (
    *(CostTarget(8, config, engine, f"{engine}-untransformed", TRANSFORM_LIMIT,
                 f"{config}: with the demo's transforms / without")
      for config, engine in zip(TRANSFORM_CASES, ("engine", "engine-stream", "engine"))),
    CostTarget(9, AIRLINE_CHUNKS, "engine-run-16", "engine-run-4096", CHUNK_LIMIT,
               "stream per step: Stream.run on chunks of 16 / of 4096"),
    CostTarget(9, AIRLINE_CHUNKS, "engine-run-1", "engine-stream", SINGLE_CHUNK_LIMIT,
               "stream: a Stream.run call on a chunk of 1 / a Stream.step"),
    CostTarget(11, AIRLINE_STEP, "c-export-stream", "engine-stream", C_STEP_SHARE,
               "airline step: exported C (-O3 -march=native) / Stream.step"),
    CostTarget(11, AIRLINE_CHUNKS, "c-export-stream", "engine-run-256", C_CHUNK_SHARE,
               "stream per step: exported C step / Stream.run on chunks of 256"),
)


def _config(results: dict, name: str) -> dict | None:
    return next((config for config in results["configs"] if config["name"] == name), None)


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def _command(config: str) -> str:
    """The command that measures one target again, alone."""
    return f"gru-engine bench --configs {config}"


def evaluate_targets(results: dict) -> list[dict]:
    """The project's performance targets, judged from this run's measurements (n/a when not measured),
    by number."""
    verdicts = []
    for target in RATIO_TARGETS:
        entry = {"number": target.number, "what": target.what, "target": f">= {target.minimum:g}x",
                 "measured": None, "verdict": "n/a", "command": _command(target.config)}
        config = _config(results, target.config)
        peer = config["implementations"].get(target.peer) if config else None
        if config is None:
            entry["note"] = f"{target.config} not measured in this run"
        elif peer is None or peer.get("ratio") is None:
            entry["note"] = f"{target.peer}: " + (peer or {}).get("note", "no measurement")
        else:
            entry.update(measured=peer["ratio"], verdict=_verdict(peer["ratio"] >= target.minimum))
        verdicts.append(entry)
    cold = results.get("cold_start")
    entry = {"number": 4, "what": "cold start: fresh `gru-engine predict` - `python -c 'import numba'`",
             "target": f"<= {COLD_START_LIMIT_S:g} s", "measured": None, "verdict": "n/a",
             "command": "gru-engine bench --configs cold-start"}
    if not cold:
        entry["note"] = "cold start not measured in this run"
    elif cold.get("difference_s") is None:
        entry["note"] = cold.get("note", "no measurement")
    else:
        entry.update(measured=cold["difference_s"], verdict=_verdict(cold["difference_s"] <= COLD_START_LIMIT_S))
    verdicts.append(entry)
    for target in COST_TARGETS:
        entry = {"number": target.number, "what": target.what, "target": f"<= {target.maximum:g}x",
                 "measured": None, "verdict": "n/a", "command": _command(target.config)}
        config = _config(results, target.config)
        implementations = config["implementations"] if config else {}
        timed, reference = (implementations.get(name, {}).get("median_s") for name in (target.timed, target.reference))
        if config is None:
            entry["note"] = f"{target.config} not measured in this run"
        elif not timed or not reference:
            entry["note"] = f"{target.timed} or {target.reference} not measured"
        else:
            entry.update(measured=timed / reference, verdict=_verdict(timed / reference <= target.maximum))
        verdicts.append(entry)
    return sorted(verdicts, key=lambda verdict: verdict["number"])


def _gflop_line(results: dict) -> str | None:
    """Target 3's companion figure: the engine's GFLOP/s next to numpy sgemm's, same thread count."""
    config = _config(results, GFLOP_CASE)
    engine = config and config["implementations"].get("engine")
    sgemm = config and results.get("sgemm", {}).get(str(config["threads"]))
    if not engine or engine.get("gflops") is None or not sgemm:
        return None
    share = engine["gflops"] / sgemm["gflops"]
    return (f"  3 H=256 T=1000 engine {engine['gflops']:.3g} GFLOP/s vs numpy sgemm {sgemm['size']}x{sgemm['size']} "
            f"{sgemm['gflops']:.3g} GFLOP/s ({share:.0%} of sgemm), {threads_label(config['threads'])}")


def _weights_line(results: dict) -> str | None:
    """Target 3's floor: every step reads the whole recurrent kernel, and reading it alone takes this long."""
    config = _config(results, GFLOP_CASE)
    read = config and results.get("weights_read", {}).get(str(config["threads"]))
    implementations = config["implementations"] if config else {}
    per_step = {name: implementations[name]["median_s"] / GFLOP_STEPS for name in ("engine", "ort-native")
                if implementations.get(name, {}).get("median_s")}
    if not read or not per_step:
        return None
    line = (f"  3 H=256 floor: reading its {read['bytes'] >> 10} KiB recurrent kernel once takes "
            f"{format_seconds(read['median_s'])} ({read['gb_per_s']:.3g} GB/s); per step: "
            + ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in per_step.items()))
    if "ort-native" in per_step:
        line += f"; 1.5x ort-native needs {format_seconds(per_step['ort-native'] / 1.5)}"
    return line


def _implementation_row(name: str, entry: dict, unit: str) -> str:
    if entry["status"] != "ok":
        return f"  {name:<{NAME_WIDTH}} {entry['status']}: {entry.get('note', '')}"
    spread = f"{format_seconds(entry['p10_s'])} .. {format_seconds(entry['p90_s'])}"
    gflops = f"{entry['gflops']:.3g}" if entry.get("gflops") is not None else "-"
    ratio = f"{entry['ratio']:.2f}x" if entry.get("ratio") is not None else "-"
    flag = "" if entry.get("agrees") in (True, None) else \
        f"  (output differs from gru-engine by {entry['max_abs_diff']:.3g})"
    return (f"  {name:<{NAME_WIDTH}} {format_seconds(entry['median_s']):>9}  {spread:<22} "
            f"{format_rate(entry['throughput_per_s'], unit):>16} {gflops:>8} {ratio:>9}{flag}")


def format_table(results: dict) -> str:
    """The whole report as text: one block per workload, sgemm, cold start, then the targets."""
    machine = results["machine"]
    lines = [f"gru-engine bench ({'quick' if results.get('quick') else 'full'} run) on {machine['cpu']}, "
             f"{machine['cores']} cores; "
             + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             "median time per call [p10 .. p90]; ratio = peer time / gru-engine time (> 1: gru-engine faster)"]
    header = (f"  {'implementation':<{NAME_WIDTH}} {'median':>9}  {'p10 .. p90':<22} {'throughput':>16} "
              f"{'GFLOP/s':>8} {'ratio':>9}")
    for config in results["configs"]:
        lines += ["", f"{config['name']}: {config['title']} (vs {config['baseline']})", header]
        unit = "step" if config["per_step"] else "seq"
        lines += [_implementation_row(name, entry, unit) for name, entry in config["implementations"].items()]
    if results.get("sgemm"):
        lines += ["", "numpy sgemm (float32 matmul): " + "; ".join(
            f"{threads_label(threads)} {entry['gflops']:.3g} GFLOP/s [p10..p90 {entry['gflops_p10']:.3g}.."
            f"{entry['gflops_p90']:.3g}]" for threads, entry in results["sgemm"].items())]
    cold = results.get("cold_start")
    if cold:
        lines.append("")
        if cold.get("difference_s") is None:
            lines.append(f"cold start: {cold.get('note', 'not measured')}")
        else:
            lines.append(f"cold start (median of {cold['runs']}): `gru-engine predict` on the airline bundle "
                         f"{format_seconds(cold['predict_s'])}, `python -c 'import numba'` "
                         f"{format_seconds(cold['import_numba_s'])}: difference {cold['difference_s']:+.3f} s")
    if results.get("score"):
        lines += [""] + format_lines(results["score"])
    targets = results.get("targets") or evaluate_targets(results)
    if all(target["measured"] is None for target in targets):
        lines += ["", "the project's performance targets: none measured in this run (they need the built-in "
                  "workloads: gru-engine bench)"]
        return "\n".join(lines)
    lines += ["", "the project's performance targets, measured in this run (each line ends with the command "
                  "that checks it alone)"]
    for target in targets:
        measured = target["measured"]
        shown = "-" if measured is None else (f"{measured:.3g} s" if target["number"] == 4 else f"{measured:.3g}x")
        note = f"  ({target['note']})" if target.get("note") else ""
        lines.append(f"  {target['number']:>2} {target['what']:<67} {shown:>9}  target {target['target']:<8} "
                     f"{target['verdict']}{note}  [{target['command']}]")
        if target["number"] == 3:
            lines += [line for line in (_gflop_line(results), _weights_line(results)) if line]
    return "\n".join(lines)


def write_json(results: dict, path):
    def write(temp):
        with open(temp, "w") as handle:
            json.dump(results, handle, indent=2, allow_nan=False)
            handle.write("\n")
    return atomic_write(path, write)


def write_chart(results: dict, path):
    """Bars of median latency (p10..p90 whiskers), per implementation, per workload, log scale."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the caller's process

    configs = results["configs"]
    names = list(dict.fromkeys(name for config in configs for name, entry in config["implementations"].items()
                               if entry["status"] == "ok"))
    palette = matplotlib.colormaps["tab10"]
    colors = {name: palette(index % 10) for index, name in enumerate(names)}
    figure = Figure(figsize=(min(18.0, max(8.0, 0.9 * len(configs) + 3)), 6.5))
    axes = figure.add_subplot()
    labelled = set()
    for position, config in enumerate(configs):
        # Each workload's bars sit side by side, whichever implementations it has.
        present = [(name, entry) for name, entry in config["implementations"].items() if entry["status"] == "ok"]
        width = 0.8 / max(len(present), 3)
        for index, (name, entry) in enumerate(present):
            median = entry["median_s"]
            axes.bar(position + (index - (len(present) - 1) / 2) * width, median, width, color=colors[name],
                     yerr=[[median - entry["p10_s"]], [entry["p90_s"] - median]], capsize=2,
                     label=None if name in labelled else name)
            labelled.add(name)
    axes.set_yscale("log")
    axes.set_ylabel("median time per call (s), log scale")
    axes.set_xticks(range(len(configs)))
    axes.set_xticklabels([f"{c['name']}\n{threads_label(c['threads'])}" for c in configs], rotation=30,
                         ha="right", fontsize=8)
    machine = results["machine"]
    axes.set_title(f"gru-engine bench: {machine['cpu']}, {machine['cores']} cores (lower is faster)", fontsize=10)
    if labelled:  # a run of only the cold-start or score timings has no bars
        axes.legend(fontsize=8, ncol=2)
    axes.grid(axis="y", which="both", alpha=0.3)
    figure.tight_layout()

    def write(temp):
        figure.savefig(temp, format="png", dpi=110)
    return atomic_write(path, write)


def finite(value) -> float | None:
    """A float for JSON, or None for NaN/inf (JSON has neither)."""
    return float(value) if value is not None and math.isfinite(value) else None
