"""Step 8 of ``gru-engine demo``: the tutorial's claim "GRU is cheaper than LSTM", measured.

The level model is trained a second time with LSTM layers, LSTM(50) -> LSTM(50) -> Dense(1), on the
same windows, encoding, seed and schedule (``demo.carry_through``). This module sets the two side
by side: parameter counts, training time, held-out RMSE beside seasonal-naive, and the latency of
the engine and of onnxruntime (native graph) per window and per streamed step, measured as
``gru-engine bench --quick`` times calls (the two models interleaved, one thread). It ends with
a plain verdict; the figures go to the printout, report.json and comparison.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .fileio import atomic_write

# Latencies compared: (label, per streamed step, implementation).
LATENCIES = (("engine per window", False, "engine"), ("onnxruntime per window", False, "ort-native"),
             ("engine per step", True, "engine-stream"), ("onnxruntime per step", True, "ort-native-stream"))


def measure_latencies(models: dict, window: int) -> tuple[dict | None, str]:
    """Per model, {label: median seconds or None} for windows of ``window`` steps at batch 1, one
    thread; or (None, why) without the bench.

    Both models' calls of one kind (per window, per step) are sampled in one round-robin, so a busy
    machine's drift hits the GRU and the LSTM alike (``gru-engine bench``'s timing, quick budget).
    """
    try:
        from .bench import runner, timing
        from .bench.registry import IMPLEMENTATIONS, Subject
        from .bench.workloads import Recipe, Workload
    except ImportError as exc:
        return None, f"the benchmark runner (gru_engine.bench) is not available: {exc}"
    print("    timing engine and onnxruntime per window and per step, the two models interleaved", flush=True)
    latencies = {name: {} for name in models}
    with tempfile.TemporaryDirectory(prefix="gru-engine-demo-") as directory:  # the ONNX graphs timed
        subjects = {name: Subject(model, name=name, workdir=Path(directory) / name) for name, model in models.items()}
        for per_step in (False, True):
            calls = {}
            for name, subject in subjects.items():
                workload = Workload(name, Recipe(name), 1, window, 1, per_step=per_step)
                for label, step, implementation in LATENCIES:
                    if step == per_step:
                        calls[name, label] = runner.prepare_call(IMPLEMENTATIONS[implementation], subject,
                                                                 workload, workload.input())
            samples, _ = timing.round_robin(calls, timing.QUICK)  # a call that fails has no samples: None
            for name, label in calls:
                values = samples.get((name, label))
                latencies[name][label] = timing.summarize(values)["median_s"] if values else None
    return latencies, ""


def figures(models: dict[str, dict], scores: dict, latencies: dict | None) -> dict:
    """The comparison as plain data. ``models``: name -> {"keras": model, "training": {...}}."""
    table = {}
    for name, model in models.items():
        table[name] = {"parameters": int(model["keras"].count_params()),
                       "training_seconds": model["training"]["seconds"],
                       "held_out_rmse": scores[name]["rmse"],
                       "latency_s": None if latencies is None else latencies[name]}
    return {"models": table, "seasonal_naive_rmse": scores["seasonal-naive"]["rmse"]}


def _time(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f} us"


def _ratio(numerator, denominator) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


# Time ratios closer to 1 than this are called equal: run-to-run noise on a shared machine.
SAME_TIME = 0.10


def verdict(data: dict, gru: str, lstm: str) -> str:
    """A plain answer to "GRU is cheaper than LSTM": by how much, in parameters and time, and at what accuracy."""
    g, l = data["models"][gru], data["models"][lstm]
    fewer = 1 - g["parameters"] / l["parameters"]
    parts = [f"the GRU has {fewer:.0%} fewer parameters ({g['parameters']:,} vs {l['parameters']:,})"]
    slower = []  # per measurement: +1 the LSTM is slower, 0 the same within SAME_TIME, -1 faster
    if g["latency_s"] is not None:
        for label in ("engine per window", "engine per step"):
            ratio = _ratio(l["latency_s"][label], g["latency_s"][label])
            if ratio is None:
                continue
            slower.append(0 if abs(ratio - 1) <= SAME_TIME else (1 if ratio > 1 else -1))
            judged = {1: "slower", 0: "the same within noise", -1: "faster"}[slower[-1]]
            parts.append(f"on gru-engine the LSTM takes {ratio:.2f}x the GRU's time {label.split(' ', 1)[1]} "
                         f"({_time(l['latency_s'][label])} vs {_time(g['latency_s'][label])}: {judged})")
    parts.append(f"training took {l['training_seconds']:.1f} s for the LSTM and {g['training_seconds']:.1f} s for "
                 "the GRU")
    if fewer <= 0 or -1 in slower:
        holds = "does NOT hold"
    elif slower and all(judged == 1 for judged in slower):
        holds = "HOLDS"
    elif 1 in slower:
        holds = "HOLDS in parameters and in part in time"
    else:
        holds = "HOLDS in parameters only" + ("" if not slower else " (the run times are the same within noise)")
    better = "GRU" if g["held_out_rmse"] < l["held_out_rmse"] else "LSTM"
    accuracy = (f"held-out RMSE {g['held_out_rmse']:.1f} for the GRU and {l['held_out_rmse']:.1f} for the LSTM "
                f"(seasonal-naive {data['seasonal_naive_rmse']:.1f}): the {better} is the more accurate here")
    return f'"GRU is cheaper than LSTM" {holds} on this run: ' + "; ".join(parts) + f". At what accuracy: {accuracy}."


def print_table(data: dict) -> None:
    names = list(data["models"])
    print(f"    {'':<26}" + "".join(f"{name:>16}" for name in names))
    rows = [("parameters", lambda m: f"{m['parameters']:,}"),
            ("training time", lambda m: f"{m['training_seconds']:.1f} s"),
            ("held-out RMSE", lambda m: f"{m['held_out_rmse']:.1f}")]
    rows += [(label, lambda m, label=label: _time(m["latency_s"][label]) if m["latency_s"] else "-")
             for label, _, _ in LATENCIES]
    for label, cell in rows:
        print(f"    {label:<26}" + "".join(f"{cell(data['models'][name]):>16}" for name in names))
    print(f"    {'seasonal-naive RMSE':<26}{data['seasonal_naive_rmse']:>16.1f}")


def plot(path: Path, data: dict) -> Path:
    """Four panels: parameters, training time, held-out RMSE (seasonal-naive dashed), latencies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(data["models"])
    models = [data["models"][name] for name in names]
    colors = ("tab:blue", "tab:green")
    figure, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    for axis, key, title in ((axes[0], "parameters", "parameters"), (axes[1], "training_seconds", "training (s)"),
                             (axes[2], "held_out_rmse", "held-out RMSE (passengers)")):
        axis.bar(names, [model[key] for model in models], color=colors)
        axis.set_title(title, fontsize=10)
    axes[2].axhline(data["seasonal_naive_rmse"], color="0.4", linestyle="--", label="seasonal-naive")
    axes[2].legend(fontsize=8)
    if models[0]["latency_s"] is not None:
        labels = [label for label, _, _ in LATENCIES]
        positions = np.arange(len(labels))
        for index, (name, model, color) in enumerate(zip(names, models, colors)):
            values = [(model["latency_s"][label] or 0.0) * 1e6 for label in labels]
            axes[3].bar(positions + 0.4 * index, values, width=0.4, color=color, label=name)
        axes[3].set_xticks(positions + 0.2, [label.replace(" per ", "\nper ") for label in labels], fontsize=7)
        axes[3].set_title("latency, batch 1 (us)", fontsize=10)
        axes[3].legend(fontsize=8)
    else:
        axes[3].set_axis_off()
    figure.suptitle("GRU vs LSTM on the airline windows (same encoding, seed and schedule)")
    figure.tight_layout()
    path = atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
    return path


def compare(gru, lstm, scores: dict, out: Path, measure: bool, window: int) -> dict:
    """Step 8: two of the demo's ``Outcome``s (GRU, then LSTM) side by side, a plain verdict, comparison.png."""
    print(f"\n[8] is GRU cheaper than LSTM? The {gru.approach.name} model (GRU) against the {lstm.approach.name} "
          "model (LSTM): same windows, encoding, seed and schedule", flush=True)
    latencies, why = measure_latencies({outcome.approach.name: outcome.model for outcome in (gru, lstm)},
                                       window) if measure else (None, "--no-bench was given")
    if why:
        print(f"    no latencies: {why}")
    data = figures({outcome.approach.name: {"keras": outcome.model, "training": outcome.training}
                    for outcome in (gru, lstm)}, scores, latencies)
    print_table(data)
    data["verdict"] = verdict(data, gru.approach.name, lstm.approach.name)
    if why:
        data["latency_skipped"] = why
    print(f"    {data['verdict']}")
    plot(out / "comparison.png", data)
    return data
