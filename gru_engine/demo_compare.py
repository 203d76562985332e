"""Step 8 of ``gru-engine demo``: the tutorial's claim "GRU is cheaper than LSTM", measured.

The level model is trained a second time with LSTM layers, LSTM(50) -> LSTM(50) -> Dense(1), on the
same windows, encoding, seed and schedule (``demo.carry_through``). This module sets the two side
by side: parameter counts, training time, held-out RMSE beside seasonal-naive, and the latency of
the engine and of onnxruntime (native graph) per window and per streamed step, measured as
``gru-engine bench --quick`` measures (interleaved, in a worker process, one thread). It ends with
a plain verdict; the figures go to the printout, report.json and comparison.png.
"""

from __future__ import annotations

from pathlib import Path

from .fileio import atomic_write

# Latencies compared: (label, workload suffix, implementation).
LATENCIES = (("engine per window", "b1", "engine"), ("onnxruntime per window", "b1", "ort-native"),
             ("engine per step", "step", "engine-stream"), ("onnxruntime per step", "step", "ort-native-stream"))
IMPLEMENTATIONS = sorted({implementation for _, _, implementation in LATENCIES})


def measure_latencies(keras_paths: dict[str, Path]) -> tuple[dict | None, str]:
    """Per model, {label: median seconds or None}, at batch 1; or (None, why) when the bench is absent."""
    try:
        from .bench import runner
    except ImportError as exc:
        return None, f"the benchmark runner (gru_engine.bench.runner) is not available: {exc}"
    workloads = {name: runner.user_workloads(path) for name, path in keras_paths.items()}
    print("    timing engine and onnxruntime per window and per step (progress on stderr)", flush=True)
    results = runner.run_benchmarks([w for group in workloads.values() for w in group], quick=True,
                                    implementations=IMPLEMENTATIONS)
    configs = {config["name"]: config for config in results["configs"]}
    latencies = {}
    for name, group in workloads.items():
        key = group[0].recipe.key
        latencies[name] = {}
        for label, suffix, implementation in LATENCIES:
            entry = configs.get(f"{key}-{suffix}", {}).get("implementations", {}).get(implementation, {})
            latencies[name][label] = entry.get("median_s") if entry.get("status") == "ok" else None
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


def verdict(data: dict, gru: str, lstm: str) -> str:
    """A plain answer to "GRU is cheaper than LSTM": by how much, in parameters and time, and at what accuracy."""
    g, l = data["models"][gru], data["models"][lstm]
    fewer = 1 - g["parameters"] / l["parameters"]
    parts = [f"the GRU has {fewer:.0%} fewer parameters ({g['parameters']:,} vs {l['parameters']:,})"]
    cheaper = fewer > 0
    if g["latency_s"] is not None:
        for label in ("engine per window", "engine per step"):
            ratio = _ratio(l["latency_s"][label], g["latency_s"][label])
            if ratio is None:
                continue
            cheaper &= ratio > 1
            parts.append(f"on gru-engine the LSTM takes {ratio:.2f}x the GRU's time {label.split(' ', 1)[1]} "
                         f"({_time(l['latency_s'][label])} vs {_time(g['latency_s'][label])})")
    parts.append(f"training took {l['training_seconds']:.1f} s for the LSTM and {g['training_seconds']:.1f} s for "
                 "the GRU")
    better = "GRU" if g["held_out_rmse"] < l["held_out_rmse"] else "LSTM"
    accuracy = (f"held-out RMSE {g['held_out_rmse']:.1f} for the GRU and {l['held_out_rmse']:.1f} for the LSTM "
                f"(seasonal-naive {data['seasonal_naive_rmse']:.1f}): the {better} is the more accurate here")
    holds = "HOLDS" if cheaper else "does NOT hold"
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


def compare(gru, lstm, scores: dict, out: Path, measure: bool) -> dict:
    """Step 8: two of the demo's ``Outcome``s (GRU, then LSTM) side by side, a plain verdict, comparison.png."""
    print(f"\n[8] is GRU cheaper than LSTM? The {gru.approach.name} model (GRU) against the {lstm.approach.name} "
          "model (LSTM): same windows, encoding, seed and schedule", flush=True)
    latencies, why = measure_latencies({
        outcome.approach.name: outcome.files[f"{outcome.approach.name}.keras"] for outcome in (gru, lstm)}) \
        if measure else (None, "--no-bench was given")
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
