"""What ``gru-engine demo`` reports: each approach's ``Outcome``, the held-out scores (step 5), the
forecast chart, report.json's figures and the closing summary (step 7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import __version__
from .demo_data import WINDOW, Approach, Windows, baselines, score
from .fileio import atomic_write


@dataclasses.dataclass
class Outcome:
    """One approach carried through training, export and parity."""

    approach: Approach
    cell: str                       # the recurrent layers: GRU or LSTM
    model: object                   # the trained Keras model
    training: dict
    files: dict[str, Path]
    differences: dict               # implementation -> verify.Difference against Keras
    forecast: np.ndarray            # (N,) the engine's passengers for every window's target month
    onnx_skipped: str = ""

    @property
    def bundle_path(self) -> Path:
        return self.files[f"{self.approach.name}.gru.safetensors"]


def judge(windows: Windows, outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """Step 5: every forecast scored on the same held-out months; says plainly who loses to seasonal-naive."""
    held_out = windows.held_out
    predictions = {outcome.approach.name: outcome.forecast for outcome in outcomes} | baselines(windows)
    scores = {name: score(prediction[held_out], windows.y[held_out]) for name, prediction in predictions.items()}
    targets = windows.target_months[held_out]
    print(f"\n[5] one month ahead on the {len(targets)} held-out months {month_label(targets[0])} .. "
          f"{month_label(targets[-1])}, in passengers (thousands):")
    print(f"    {'forecast':<16}{'RMSE':>8}{'MAPE %':>9}")
    for name, figures in scores.items():
        print(f"    {name:<16}{figures['rmse']:>8.1f}{figures['mape']:>9.1f}")
    naive = scores["seasonal-naive"]["rmse"]
    for outcome in outcomes:
        rmse = scores[outcome.approach.name]["rmse"]
        if rmse < naive:
            print(f"    the {outcome.approach.name} model beats seasonal-naive (RMSE {rmse:.1f} vs {naive:.1f})")
        else:
            print(f"    the {outcome.approach.name} model does NOT beat seasonal-naive (RMSE {rmse:.1f} vs "
                  f"{naive:.1f}): repeating the month a year earlier forecasts better than this model")
    return scores


def report_figures(args, windows: Windows, outcomes: list[Outcome], scores: dict, bench_results,
                   next_month: dict, skipped: dict, files: list[str], seconds: float, comparison=None) -> dict:
    """Every figure the demo printed, for report.json."""
    targets = windows.target_months
    models = {}
    for outcome in outcomes:
        name = outcome.approach.name
        models[name] = {
            "title": outcome.approach.title, "layers": outcome.cell, "transforms": outcome.approach.transforms,
            "training": outcome.training,
            "parity": {key: {"largest": _finite(d.largest), "excess": _finite(d.excess), "ok": d.ok,
                             "problem": d.problem} for key, d in outcome.differences.items()},
            "held_out": scores[name],
            "beats_seasonal_naive": scores[name]["rmse"] < scores["seasonal-naive"]["rmse"],
            "forecast_after_last_window": next_month[name],
        }
    return {
        "gru_engine_version": __version__, "seed": args.seed, "epochs": args.epochs, "window": WINDOW,
        "data": {"months": len(windows.series), "first": month_label(windows.months[0]),
                 "last": month_label(windows.months[-1])},
        "split": {"windows": len(windows.x), "training_windows": windows.split,
                  "held_out_windows": len(windows.x) - windows.split,
                  "training_targets": [month_label(targets[0]), month_label(targets[windows.split - 1])],
                  "held_out_targets": [month_label(targets[windows.split]), month_label(targets[-1])],
                  "min_max_fitted_on": [month_label(windows.months[0]),
                                        month_label(windows.months[windows.training_months][-1])]},
        "models": models,
        "baselines": {name: scores[name] for name in baselines(windows)},
        "parity_ok": all(d.ok for outcome in outcomes for d in outcome.differences.values()),
        "forecast_month_after_last_window": month_label(windows.months[-1] + 1),
        "benchmark": bench_results,
        "gru_vs_lstm": comparison,
        "skipped": skipped,
        "files": files,
        "wall_seconds": round(seconds, 1),
    }


FILE_ROLES = {
    "forecast.png": "true vs predicted passengers, held-out months shaded",
    "latency.png": "benchmark latencies",
    "comparison.png": "GRU vs LSTM: parameters, training time, held-out RMSE, latency",
    "report.json": "every figure above",
    "last-window.csv": "the last 10 months, an input for gru-engine predict",
    ".gru.safetensors": "bundle; predict takes and returns passengers",
    ".keras": "the trained Keras model (gru-engine verify takes it)",
    ".native.onnx": "ONNX, native GRU or LSTM operators (network units)",
    ".tf2onnx.onnx": "ONNX, tf2onnx converter (network units)",
}


def summarize(out: Path, files: dict[str, Path], skipped: dict, report: dict, next_month: dict) -> None:
    print(f"\nDone in {report['wall_seconds']:.0f} s. In {out}/:")
    for name in sorted(files):
        role = next(role for suffix, role in FILE_ROLES.items() if name.endswith(suffix))
        print(f"    {name:<28} {role}")
    for step, reason in skipped.items():
        print(f"    no {step} files: {reason}")
    for name, outcome in report["models"].items():
        verdict = "beats" if outcome["beats_seasonal_naive"] else "does NOT beat"
        print(f"The {name} model: held-out RMSE {outcome['held_out']['rmse']:.1f} passengers, {verdict} "
              f"seasonal-naive ({report['baselines']['seasonal-naive']['rmse']:.1f}); forecast for "
              f"{report['forecast_month_after_last_window']}: {next_month[name]:.0f}.")
    if report["gru_vs_lstm"]:
        print(report["gru_vs_lstm"]["verdict"])
    print(f"Try: gru-engine predict {files['level.gru.safetensors']} --input {files['last-window.csv']}")


# 7. Charts, report, summary ----------------------------------------------------------------------

def plot_forecast(path: Path, windows: Windows, forecasts: dict[str, np.ndarray], scores: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = windows.months.astype("datetime64[D]")  # matplotlib dates need day resolution
    targets = months[WINDOW:]
    figure, axes = plt.subplots(figsize=(10, 4.8))
    axes.axvspan(targets[windows.split], months[-1], color="0.9", label="held out")
    axes.plot(months, windows.series, color="black", linewidth=1.6, label="passengers (true)")
    held_out = windows.held_out
    axes.plot(targets[held_out], baselines(windows)["seasonal-naive"][held_out], color="0.5", linestyle=":",
              label=f"seasonal-naive (RMSE {scores['seasonal-naive']['rmse']:.1f})")
    for (name, forecast), color in zip(forecasts.items(), ("tab:orange", "tab:blue", "tab:green")):
        axes.plot(targets, forecast, color=color, linewidth=1.2,
                  label=f"{name} model (held-out RMSE {scores[name]['rmse']:.1f})")
    axes.set_title("Airline passengers: one-month-ahead forecasts, run on gru-engine")
    axes.set_ylabel("passengers (thousands)")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path = atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=110))
    plt.close(figure)
    return path


def month_label(value) -> str:
    """A datetime64 as its month, e.g. 1960-12."""
    return str(np.datetime64(value, "M"))


def _finite(value: float) -> float | None:
    """JSON has no infinity: an incomparable pair's figures are null (its ``problem`` says why)."""
    return value if np.isfinite(value) else None
