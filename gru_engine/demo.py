"""``gru-engine demo``: the airline-passengers GRU tutorial, made real and carried through to deployment.

One command, no network. Each step is one function, here or in ``demo_data`` (the series, its
windows and encodings) and ``demo_report`` (scores, chart, report, summary):

1. ``load_series``: the monthly series shipped in the package (1949-01 .. 1960-12).
2. ``make_windows`` and ``train``: windows of 10 months -> the next month; the last 20% of the windows
   are held out. The tutorial's network, GRU(50, return_sequences=True) -> GRU(50) -> Dense(1), Adam,
   MSE, batch 32, is trained twice on two encodings of the same windows (``Approach``):
   - tutorial: min-max scaled to [0, 1], the scaler fitted on the months the training windows span;
   - level: log, minus the window's mean log; the prediction gets that mean back, then exp. It
     follows the series' level, which min-max scaling fitted on 1949-1958 cannot reach in 1959-1960.
3. ``export``: a bundle whose manifest declares the encoding as input/output transforms (so
   ``gru-engine predict`` takes and returns passengers), and the native and tf2onnx ONNX graphs.
4. ``check_parity``: Keras, the engine and onnxruntime (both graphs) on every window, in network
   units; and the engine on raw passenger windows against this module's own decoding of Keras's output.
5. ``judge``: RMSE and MAPE in passengers on the held-out months, beside the seasonal-naive
   (12 months earlier) and last-value baselines.
6. ``benchmark``: the tutorial model, as ``gru-engine bench --quick``.
7. forecast.png, latency.png, report.json and a summary naming every file.
8. The tutorial's claim "GRU is cheaper than LSTM" measured (``demo_compare``): the level model is
   also trained with LSTM layers, on the same windows, seed and schedule, carried through steps 2
   to 5 like the others, then compared (comparison.png); ``--no-lstm`` skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import bundle, demo_compare
from .demo_data import (HELD_OUT_FRACTION, WINDOW, Approach, Windows, level_approach, load_series, make_windows,
                        network_inputs, tutorial_approach)
from .demo_report import Outcome, judge, month_label, plot_forecast, report_figures, summarize
from .fileio import atomic_write, atomic_write_bytes, save_array

UNITS = 50
BATCH_SIZE = 32
DEFAULT_EPOCHS = 50
DEFAULT_SEED = 0
DEFAULT_OUT = "demo-out"
ONNX_METHODS = ("native", "tf2onnx")


# 2. Training -------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Same seed, same weights, same shuffles, same float reductions: two runs agree."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train(approach: Approach, windows: Windows, epochs: int, seed: int, cell: str = "GRU"):
    """The tutorial's network (with ``cell`` layers: GRU or LSTM) and training, on ``approach``'s
    encoding; returns (model, figures)."""
    import keras

    seed_everything(seed)
    x = network_inputs(approach, windows)                                  # (N, WINDOW, 1)
    y = approach.encode(windows.x, windows.y[:, None]).astype(np.float32)  # (N, 1)
    layer = getattr(keras.layers, cell)
    model = keras.Sequential([keras.Input((WINDOW, 1)),
                              layer(UNITS, return_sequences=True),
                              layer(UNITS),
                              keras.layers.Dense(1)], name=approach.name)
    model.compile(optimizer="adam", loss="mse")
    train_part, held_out = slice(0, windows.split), windows.held_out
    started = time.perf_counter()
    # Held-out loss is shown, never used: no early stopping, no model selection.
    history = model.fit(x[train_part], y[train_part], batch_size=BATCH_SIZE, epochs=epochs,
                        validation_data=(x[held_out], y[held_out]),
                        verbose=1 if sys.stdout.isatty() else 2)  # a bar on a terminal, a line per epoch in a log
    return model, {"seconds": round(time.perf_counter() - started, 2),
                   "final_loss": float(history.history["loss"][-1]),
                   "final_held_out_loss": float(history.history["val_loss"][-1])}


# 3. Export ---------------------------------------------------------------------------------------

def save_keras(model, path: Path) -> Path:
    """Keras insists on a .keras name, so it writes beside the temp file, which then takes its place."""
    def write(temp):
        named = temp + ".keras"
        try:
            model.save(named)
            os.replace(named, temp)
        finally:
            if os.path.exists(named):
                os.unlink(named)
    return atomic_write(path, write)


def export_bundle(model, approach: Approach, path: Path) -> Path:
    """The bundle, its manifest declaring the approach's encoding as input/output transforms."""
    from .exporters import read_keras

    spec = read_keras(model)
    spec.transforms = approach.transforms
    return bundle.save(spec, path)


def export_onnx_graphs(model, out: Path, name: str) -> tuple[dict[str, Path], str]:
    """Both ONNX graphs (network units: ONNX carries no transforms); ({} and why) if the exporter is absent."""
    try:
        from .exporters import export_onnx
    except ImportError as exc:
        return {}, f"the ONNX exporter (gru_engine.exporters.export_onnx) is not available: {exc}"
    return {method: Path(export_onnx(model, out / f"{name}.{method}.onnx", method=method))
            for method in ONNX_METHODS}, ""


# 4. Parity ---------------------------------------------------------------------------------------

def check_parity(model, approach: Approach, windows: Windows, bundle_path: Path, onnx_paths: dict):
    """Every window through Keras, the engine and onnxruntime; returns (differences, engine passengers (N,))."""
    import gru_engine
    from .exporters.keras_reader import keras_outputs
    from .exporters.verify import compare, onnx_runner

    x = network_inputs(approach, windows)          # (N, WINDOW, 1)
    reference = keras_outputs(model, x)[0]          # (N, 1) network units
    engine = gru_engine.load(bundle_path)           # replays the bundle's self-check too
    differences = {"engine": compare(engine.predict_raw(x), reference)}
    for method, path in onnx_paths.items():
        differences[f"onnxruntime-{method}"] = compare(onnx_runner(path)(x), [reference])
    # The deployed path: raw passenger windows in, passengers out, through the bundle's transforms.
    passengers = engine.predict(windows.x[..., None])  # (N, 1)
    differences["engine-passengers"] = compare(passengers, approach.decode(windows.x, reference))
    return differences, passengers[:, 0]


# 6. Benchmark ------------------------------------------------------------------------------------

def benchmark(keras_path: Path, chart_path: Path) -> tuple[dict | None, str]:
    """``gru-engine bench --quick`` on the trained model at batch 1, per window and per step.

    Prints the table and writes the chart; returns (the results, "") or (None, why it was skipped).
    """
    try:
        from .bench import runner
    except ImportError as exc:
        return None, f"the benchmark runner (gru_engine.bench.runner) is not available: {exc}"
    print(f"\n[6] benchmark of {keras_path.name}, as gru-engine bench --quick --model {keras_path.name} "
          "(progress on stderr)", flush=True)
    results = runner.run_benchmarks(runner.user_workloads(keras_path), quick=True)
    print(runner.format_table(results))
    runner.write_chart(results, chart_path)
    return results, ""


# The steps, run and reported in order ---------------------------------------------------------

def carry_through(approach: Approach, windows: Windows, epochs: int, seed: int, out: Path,
                  cell: str = "GRU") -> Outcome:
    """Steps 2 to 4 for one approach, each reported as it happens."""
    name = approach.name
    print(f"\n[2] training the {approach.title}: {cell} {UNITS} -> {cell} {UNITS} -> Dense 1, Adam, MSE, "
          f"batch {BATCH_SIZE}, {epochs} epochs, seed {seed}", flush=True)
    model, training = train(approach, windows, epochs, seed, cell)
    print(f"[3] exporting the {name} model; the bundle declares its transforms: "
          + ", ".join(step["kind"] for step in approach.transforms))
    files = {f"{name}.keras": save_keras(model, out / f"{name}.keras"),
             f"{name}.gru.safetensors": export_bundle(model, approach, out / f"{name}.gru.safetensors")}
    onnx_paths, onnx_skipped = export_onnx_graphs(model, out, name)
    if onnx_skipped:
        print(f"    SKIPPED the ONNX export: {onnx_skipped}")
    files.update({path.name: path for path in onnx_paths.values()})
    print(f"[4] parity on all {len(windows.x)} windows (pass: gru_engine.spec.max_excess <= 0)")
    differences, forecast = check_parity(model, approach, windows, files[f"{name}.gru.safetensors"], onnx_paths)
    for implementation, difference in differences.items():
        units = "passengers" if implementation == "engine-passengers" else "network units"
        print(f"    {implementation:<20} vs keras, in {units}: {difference.describe()}")
    return Outcome(approach, cell, model, training, files, differences, forecast, onnx_skipped)


LSTM_MODEL = "level-lstm"


def _forecast_next(bundle_path: Path, last_window: np.ndarray) -> float:
    import gru_engine
    return float(gru_engine.load(bundle_path).predict(last_window[None])[0, 0])


# The command -------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gru-engine demo",
        description="Train the airline-passengers GRU tutorial (and a level-following variant), export, verify, "
                    "judge against baselines, benchmark; every figure and file goes to an output folder.",
        epilog="example: gru-engine demo --epochs 20 --out airline-demo --no-bench")
    parser.add_argument("--epochs", type=_at_least(1), default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--seed", type=_at_least(0), default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    parser.add_argument("--no-bench", action="store_true",
                        help="skip the benchmark (latency.png, and the latencies of the GRU vs LSTM comparison)")
    parser.add_argument("--no-lstm", action="store_true",
                        help="skip the GRU vs LSTM comparison (no LSTM model is trained)")
    return parser.parse_args(argv)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return value
    return parse


def _output_folder(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = _output_folder(args.out)
    from .exporters.tensorflow_quiet import import_tensorflow
    import_tensorflow()  # before anything else imports it: see there

    months, series = load_series()
    windows = make_windows(months, series)
    targets = windows.target_months
    fitted = windows.months[windows.training_months]
    print(f"[1] data: {len(series)} months of airline passengers (thousands), {month_label(months[0])} .. "
          f"{month_label(months[-1])}, shipped in the package")
    print(f"[2] {len(windows.x)} windows of {WINDOW} months -> the next month. Training: the first {windows.split} "
          f"(targets {month_label(targets[0])} .. {month_label(targets[windows.split - 1])}); the min-max scaler is "
          f"fitted on the months they span, {month_label(fitted[0])} .. {month_label(fitted[-1])}. Held out: the "
          f"last {HELD_OUT_FRACTION:.0%}, {len(windows.x) - windows.split} windows whose targets are the months "
          f"{month_label(targets[windows.split])} .. {month_label(targets[-1])}; every score is on exactly those "
          "months.")

    outcomes = [carry_through(approach, windows, args.epochs, args.seed, out)
                for approach in (tutorial_approach(windows), level_approach())]
    if not args.no_lstm:
        lstm = dataclasses.replace(level_approach(), name=LSTM_MODEL, title="level model with LSTM layers")
        outcomes.append(carry_through(lstm, windows, args.epochs, args.seed, out, cell="LSTM"))
    scores = judge(windows, outcomes)
    skipped = {"onnx": outcomes[0].onnx_skipped} if outcomes[0].onnx_skipped else {}

    files = {name: path for outcome in outcomes for name, path in outcome.files.items()}
    if args.no_bench:
        bench_results, why = None, "--no-bench was given"
    else:
        bench_results, why = benchmark(outcomes[0].files["tutorial.keras"], out / "latency.png")
    if why:
        skipped["benchmark"] = why
        print(f"\n[6] SKIPPED the benchmark (and latency.png): {why}")
    else:
        files["latency.png"] = out / "latency.png"

    comparison = None
    if args.no_lstm:
        skipped["gru-vs-lstm"] = "--no-lstm was given"
    else:
        comparison = demo_compare.compare(outcomes[1], outcomes[2], scores, out, not args.no_bench, WINDOW)
        files["comparison.png"] = out / "comparison.png"

    print("\n[7] writing forecast.png, last-window.csv, report.json")
    files["forecast.png"] = plot_forecast(out / "forecast.png", windows, {
        outcome.approach.name: outcome.forecast for outcome in outcomes}, scores)
    last_window = windows.series[-WINDOW:, None]  # (WINDOW, 1) the last 10 months: gru-engine predict's CSV input
    files["last-window.csv"] = save_array(out / "last-window.csv", last_window)
    next_month = {outcome.approach.name: _forecast_next(outcome.bundle_path, last_window) for outcome in outcomes}
    report = report_figures(args, windows, outcomes, scores, bench_results, next_month, skipped,
                            sorted([*files, "report.json"]), time.perf_counter() - started, comparison)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    files["report.json"] = atomic_write_bytes(out / "report.json", text.encode())
    summarize(out, files, skipped, report, next_month)
    if not report["parity_ok"]:
        print("PARITY FAILED: an implementation disagrees with Keras beyond tolerance (see [4] above)")
        return 1
    return 0
