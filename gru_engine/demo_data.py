"""The data of ``gru-engine demo``: the airline-passengers series shipped in the package, its windows,
the two encodings of them (``Approach``), and the scores every forecast is judged by.

Plain numpy: the benchmark builds the demo's bundles' transforms from here without training anything.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import io
from typing import Callable

import numpy as np

WINDOW = 10
HELD_OUT_FRACTION = 0.2
SEASON = 12


# 1. Data ------------------------------------------------------------------------------------------

def load_series() -> tuple[np.ndarray, np.ndarray]:
    """The shipped series: months (M,) datetime64[M] and passengers (M,) float64."""
    text = importlib.resources.files("gru_engine").joinpath("data/airline-passengers.csv").read_text()
    rows = [row for row in csv.reader(io.StringIO(text)) if row][1:]  # after the header Month,Passengers
    months = np.array([month for month, _ in rows], dtype="datetime64[M]")  # (M,)
    passengers = np.array([float(count) for _, count in rows])              # (M,)
    return months, passengers


# 2. Windows and encodings --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Windows:
    """Every window of ``WINDOW`` months and the month after it; windows [split:] are held out."""

    months: np.ndarray  # (M,) datetime64[M], the whole series
    series: np.ndarray  # (M,) passengers
    x: np.ndarray       # (N, WINDOW) passengers, N = M - WINDOW; x[i] = series[i:i + WINDOW]
    y: np.ndarray       # (N,) passengers, y[i] = series[i + WINDOW]
    split: int

    @property
    def target_months(self) -> np.ndarray:
        return self.months[WINDOW:]  # (N,)

    @property
    def held_out(self) -> slice:
        return slice(self.split, None)

    @property
    def training_months(self) -> slice:
        """The months the training windows read or predict: what a scaler may be fitted on."""
        return slice(0, self.split + WINDOW)


def make_windows(months: np.ndarray, series: np.ndarray) -> Windows:
    x = np.lib.stride_tricks.sliding_window_view(series[:-1], WINDOW)  # (N, WINDOW)
    y = series[WINDOW:]                                                 # (N,)
    return Windows(months, series, x, y, split=int(len(x) * (1 - HELD_OUT_FRACTION)))


@dataclasses.dataclass(frozen=True)
class Approach:
    """One encoding of passenger windows into network values, in Python and as bundle transforms.

    ``encode(windows, values)`` maps values (N, K) with the statistics of their windows (N, WINDOW);
    ``decode(windows, network_values)`` maps back to passengers. ``transforms`` declares the same
    mapping for the bundle, so the engine's ``predict`` can be checked against ``decode``.
    """

    name: str
    title: str
    transforms: list
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]


def tutorial_approach(windows: Windows) -> Approach:
    """Min-max scaling to [0, 1], fitted on the training months only: x' = (x - low) / (high - low)."""
    fitted = windows.series[windows.training_months]
    low, high = float(fitted.min()), float(fitted.max())
    span = high - low
    scale, offset = 1.0 / span, -low / span  # x' = x * scale + offset
    return Approach(
        "tutorial", f"tutorial model (min-max scaled: {low:g}..{high:g} passengers -> 0..1)",
        [{"kind": "affine", "scale": [scale], "offset": [offset], "output_scale": [scale],
          "output_offset": [offset]}],
        encode=lambda x, values: (values - low) / span,
        decode=lambda x, values: values * span + low)


def _window_level(x: np.ndarray) -> np.ndarray:
    return np.log(x).mean(axis=1, keepdims=True)  # (N, 1)


def level_approach() -> Approach:
    """Per window: x' = log(x) - mean(log window); the prediction is exp(y' + mean(log window))."""
    return Approach(
        "level", "level model (log, minus the window's mean log)",
        [{"kind": "log", "invert_output": True}, {"kind": "center", "invert_output": True, "output_features": [0]}],
        encode=lambda x, values: np.log(values) - _window_level(x),
        decode=lambda x, values: np.exp(values + _window_level(x)))


def network_inputs(approach: Approach, windows: Windows) -> np.ndarray:
    return approach.encode(windows.x, windows.x)[..., None].astype(np.float32)  # (N, WINDOW, 1)


# Evaluation ------------------------------------------------------------------------------------

def score(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    error = predicted - actual
    return {"rmse": float(np.sqrt(np.mean(error ** 2))), "mape": float(100 * np.mean(np.abs(error) / actual))}


def baselines(windows: Windows) -> dict[str, np.ndarray]:
    """Predictions (N,) for every window's target month."""
    targets = np.arange(WINDOW, len(windows.series))  # (N,) series index of each target
    # The first SEASON - WINDOW windows have no month a year back; they are never held out.
    seasonal = windows.series[np.maximum(targets - SEASON, 0)]
    return {"seasonal-naive": seasonal, "last-value": windows.x[:, -1]}
