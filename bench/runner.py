"""``gru-engine bench``: gru-engine against onnxruntime, TensorFlow and Keras, same machine, same run.

    gru-engine bench [--quick] [--configs NAMES] [--impls NAMES] [--model MY.keras [--steps T]]
                     [--out DIR] [--json PATH] [--chart PATH] [--list]
    python -m gru_engine.bench.runner ...        (the same)

API, for ``gru-engine demo`` and notebooks::

    from gru_engine.bench import runner
    results = runner.run_benchmarks(runner.user_workloads("model.keras"), quick=True)  # or None: built-ins
    print(runner.format_table(results))
    runner.write_json(results, "bench.json"); runner.write_chart(results, "bench.png")

``run_benchmarks(workloads=None, *, quick=True, implementations=None, cold_start=False, progress=True)``
returns a JSON-ready dict: ``machine``, ``configs`` (one per workload: ``implementations`` maps each
registry name to its ``status`` and, when ``ok``, ``median_s``, ``p10_s``, ``p90_s``,
``throughput_per_s``, ``gflops``, ``ratio``), ``sgemm``, ``weights_read`` (the H=256 recurrent kernel
read once: the floor under its step), ``cold_start``, ``targets`` (the project's performance targets).

How it measures. Workloads are grouped by thread count (1 for latency, every core for batch
throughput) and each group runs in a fresh worker process whose numba, TensorFlow and BLAS pools
are pinned to that count before any model is built (TensorFlow cannot change them once it has
started); onnxruntime sessions get the same count. Inside a worker, each implementation is
prepared and warmed up (JIT compile, session creation, tracing: its first-call time is recorded),
then all are sampled round-robin (``timing.round_robin``). A window implementation is timed per
call on the whole (batch, T, features) input; a streaming one per ``step`` of one time step with
the state carried, so engine-stream and ort-native-stream compare per step. Every peer's first
output is also compared with gru-engine's, so a fast wrong answer shows up in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gru_engine.kernels.products import padded

from . import machine, timing
from . import score as score_bench
from .registry import IMPLEMENTATIONS, Implementation, Looped, Subject
from .report import evaluate_targets, finite, format_table, write_chart, write_json
from .units import format_seconds
from .workloads import AIRLINE_STEPS, GFLOP_UNITS, Workload, airline_recipe, builtin_workloads, user_workloads

__all__ = ["run_benchmarks", "format_table", "write_chart", "write_json", "user_workloads", "builtin_workloads",
           "main"]

SCHEMA = "gru-engine-bench/1"
COLD_START = "cold-start"
COLD_START_RUNS = {True: 5, False: 11}  # by quick
SGEMM_SIZE = 512
# The H=256 case's recurrent kernel as the engine stores it: (H, 3H) float32, rows padded to 16 floats.
GFLOP_RECURRENT_BYTES = GFLOP_UNITS * int(padded(3 * GFLOP_UNITS)) * 4


# ----- inside a worker process ---------------------------------------------------------------------


def gru_flops_per_step(spec) -> float:
    """Multiply-adds x 2 of the recurrent layers for one time step of one sample: 2*G*H*(I+H) per
    direction, G gate blocks (GRU 3, LSTM 4, SimpleRNN 1)."""
    from gru_engine.spec import RECURRENT_FAMILIES, recurrent_configs, recurrent_kind, validate
    flops = 0.0
    for layer, shape in zip(spec.layers, validate(spec)):
        for config in recurrent_configs(layer):
            units = config["units"]
            flops += 2 * RECURRENT_FAMILIES[recurrent_kind(layer)].gates * units * (shape.input_dim + units)
    return flops


def unavailable_reason(impl: Implementation, subject: Subject) -> tuple[str, str] | None:
    """(status, note) when ``impl`` cannot run on ``subject`` here, else None."""
    import importlib.util
    missing = [module for module in impl.requires if importlib.util.find_spec(module) is None]
    if missing:
        return "unavailable", "not installed: " + ", ".join(missing)
    why = impl.does_not_apply(subject)
    return ("not-applicable", why) if why else None


def prepare_call(impl: Implementation, subject: Subject, workload: Workload, x: np.ndarray) -> timing.Call:
    """The zero-argument call that is timed: one window, one ``step`` of a stream opened here, or
    one chunk of ``impl.chunk`` steps (every step the first step of x)."""
    run = impl.prepare(subject, workload.threads)
    if impl.chunk:
        feed = run.start(workload.batch)
        chunk = np.ascontiguousarray(np.repeat(x[:, :1], impl.chunk, axis=1))  # (batch, chunk, features)
        return lambda: feed(chunk)
    if impl.streaming:
        run = run.start(workload.batch)
        x = np.ascontiguousarray(x[:, 0])  # (batch, features): every call feeds the same step
    if hasattr(run, "looped"):  # compiled: a Looped call, timed in its own loop
        return run.looped(x)
    return lambda: run(x)


def _first_output(result) -> np.ndarray:
    return np.asarray(result[0] if isinstance(result, (list, tuple)) else result, np.float32)


def measure_workload(workload: Workload, subject: Subject, names: list[str], budget: timing.Budget,
                     log=None) -> dict:
    """Prepare, warm up and time every named implementation of the workload's kind on it."""
    from gru_engine.spec import max_excess

    baseline = "engine-stream" if workload.per_step else "engine"
    x = workload.input()  # (batch, steps, features)
    flops = gru_flops_per_step(subject.spec) * workload.batch * (1 if workload.per_step else workload.steps)
    entries, calls, outputs = {}, {}, {}
    for name in names:
        impl = IMPLEMENTATIONS[name]
        if not workload.runs(impl):
            continue
        entry = {"description": impl.description}
        reason = unavailable_reason(impl, subject)
        if reason:
            entries[name] = dict(entry, status=reason[0], note=reason[1])
            continue
        try:
            call = prepare_call(impl, subject, workload, x)
            first_s, result = timing.warm_up(call, budget.warm_up_s)
        except ImportError as exc:  # e.g. an exporter this build does not have
            entries[name] = dict(entry, status="unavailable", note=timing.describe_error(exc))
            continue
        except Exception as exc:  # a peer that cannot run is reported; the others still are measured
            entries[name] = dict(entry, status="failed", note=timing.describe_error(exc))
            continue
        entries[name] = dict(entry, status="ok", first_call_s=first_s)
        # A chunk's first step is a stream's first step; the rest repeat it.
        calls[name], outputs[name] = call, _first_output(result)[:, 0] if impl.chunk else _first_output(result)
    # A Looped call is timed as n calls made inside its compiled loop (see registry.Looped).
    repeats = {}
    for name, call in calls.items():
        if isinstance(call, Looped):
            calls[name], repeats[name] = call.timed(budget.sample_s)
    samples, failures = timing.round_robin(calls, budget, timing.SETTLE_S if workload.threads > 1 else 0.0)
    for name, error in failures.items():
        entries[name].update(status="failed", note=error)
    for name, values in samples.items():
        entry = entries[name]
        # A Looped call's time covers its loop; a chunked stream's is reported per step.
        per_call = repeats.get(name, 1) * (IMPLEMENTATIONS[name].chunk or 1)
        entry.update(timing.summarize([value / per_call for value in values]))
        entry["throughput_per_s"] = workload.items_per_call / entry["median_s"]
        entry["gflops"] = finite(flops / entry["median_s"] / 1e9) if flops else None
    if baseline in samples:  # ratios and agreement need gru-engine's own measurement
        reference = outputs[baseline]
        for name in samples:
            entry, output = entries[name], outputs[name]
            entry["ratio"] = entry["median_s"] / entries[baseline]["median_s"]
            if not IMPLEMENTATIONS[name].same_output:
                continue
            same_shape = output.shape == reference.shape
            entry["max_abs_diff"] = finite(float(np.max(np.abs(output - reference)))) if same_shape else None
            entry["agrees"] = same_shape and max_excess(output, reference) <= 0
    if log:
        log(f"{workload.name}: " + ", ".join(
            f"{name} {format_seconds(entry['median_s'])}" if entry["status"] == "ok" else f"{name} {entry['status']}"
            for name, entry in entries.items()))
    ordered = {name: entries[name] for name in IMPLEMENTATIONS if name in entries}
    return {"name": workload.name, "title": workload.title, "model": workload.recipe.describe(),
            "batch": workload.batch, "steps": workload.steps, "features": workload.recipe.features,
            "threads": workload.threads, "per_step": workload.per_step, "baseline": baseline,
            "flops_per_call": flops or None, "implementations": ordered}


def _gru_engine_command() -> list[str]:
    """The installed ``gru-engine`` script beside this interpreter, else ``python -m gru_engine.cli``."""
    script = Path(sys.executable).parent / "gru-engine"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gru_engine.cli"]


def _wall_seconds(command: list[str]) -> float:
    start = time.perf_counter_ns()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = (time.perf_counter_ns() - start) / 1e9
    if finished.returncode != 0:
        lines = (finished.stderr or finished.stdout).strip().splitlines()
        raise RuntimeError(f"`{' '.join(command)}` failed: {lines[-1] if lines else finished.returncode}")
    return seconds


def measure_cold_start(bundle_path: Path, workdir: Path, runs: int) -> dict:
    """A fresh `gru-engine predict` process vs `python -c "import numba"`, run alternately."""
    x_path = workdir / "cold-start-input.npy"
    np.save(x_path, np.random.default_rng(0).standard_normal((1, AIRLINE_STEPS, 1)).astype(np.float32))
    predict = _gru_engine_command() + ["predict", str(bundle_path), "--input", str(x_path),
                                       "--output", str(workdir / "cold-start-output.npy")]
    baseline = [sys.executable, "-c", "import numba"]
    try:
        _wall_seconds(predict)  # fills numba's on-disk JIT cache, as any earlier run would have
        predict_s, numba_s = [], []
        for _ in range(runs):
            predict_s.append(_wall_seconds(predict))
            numba_s.append(_wall_seconds(baseline))
    except RuntimeError as exc:
        return {"note": str(exc), "difference_s": None}
    predict_median, numba_median = float(np.median(predict_s)), float(np.median(numba_s))
    return {"runs": runs, "command": predict, "predict_s": predict_median, "import_numba_s": numba_median,
            "predict_p10_s": float(np.percentile(predict_s, 10)), "predict_p90_s": float(np.percentile(predict_s, 90)),
            "difference_s": predict_median - numba_median}


def run_worker(job: dict) -> dict:
    """One thread count's share of a run, in this (fresh) process."""
    from gru_engine.exporters.tensorflow_quiet import import_tensorflow
    import_tensorflow()  # first, so its start-up lines are not printed: see there
    pinned = machine.pin_threads(job["threads"])  # before TensorFlow builds anything
    budget = timing.QUICK if job["quick"] else timing.FULL
    workdir = Path(job["workdir"])
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if job["progress"] else None
    subjects: dict[str, Subject] = {}

    def subject_for(recipe) -> Subject:
        if recipe.key not in subjects:
            subjects[recipe.key] = Subject(recipe.build(), name=recipe.key, workdir=workdir / recipe.key,
                                           transforms=recipe.transform_steps())
        return subjects[recipe.key]

    # First, while no peer's thread pool exists yet to spin on the cores it needs.
    sgemm = timing.sgemm_gflops(SGEMM_SIZE, dataclasses.replace(budget, seconds=budget.seconds / 3))
    weights_read = timing.weights_read(GFLOP_RECURRENT_BYTES, dataclasses.replace(budget, seconds=budget.seconds / 6))
    configs = []
    for data in job["workloads"]:
        workload = Workload.from_dict(data)
        configs.append(measure_workload(workload, subject_for(workload.recipe), job["implementations"], budget, log))
    part = {"threads": job["threads"], "pinned": pinned, "configs": configs, "sgemm": sgemm,
            "weights_read": weights_read}
    if job["cold_start"]:
        bundle_path = subject_for(airline_recipe()).bundle_path
        part["cold_start"] = measure_cold_start(bundle_path, workdir, COLD_START_RUNS[job["quick"]])
        if log:
            cold = part["cold_start"]
            log("cold start: " + (cold.get("note") or f"predict {cold['predict_s']:.3f} s, import numba "
                                                      f"{cold['import_numba_s']:.3f} s"))
    return part


# ----- the parent process ---------------------------------------------------------------------------


def _spawn_worker(job: dict, directory: Path) -> dict:
    job_path, out_path = directory / f"job-{job['threads']}.json", directory / f"result-{job['threads']}.json"
    job_path.write_text(json.dumps(job))
    command = [sys.executable, "-m", "gru_engine.cli", "bench", "--worker", str(job_path),
               "--worker-out", str(out_path)]
    # The worker's stdout (Keras chatter) goes to our stderr, so stdout carries only the table.
    finished = subprocess.run(command, env=machine.thread_environment(job["threads"]), stdout=2)
    if finished.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"the benchmark worker for {job['threads']} thread(s) failed (exit "
                           f"{finished.returncode}); its messages are above")
    return json.loads(out_path.read_text())


def run_benchmarks(workloads=None, *, quick: bool = True, implementations=None, cold_start: bool = False,
                   progress: bool = True, score: bool = False) -> dict:
    """Measure ``workloads`` (default: the built-in set) with ``implementations`` (default: all).

    See the module docstring for the returned dict. ``cold_start`` adds the fresh-process timing,
    ``score`` the Dask scoring comparison (``bench/score.py``).
    """
    started = time.perf_counter()
    workloads = builtin_workloads(quick) if workloads is None else list(workloads)
    names = list(IMPLEMENTATIONS) if implementations is None else list(implementations)
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(IMPLEMENTATIONS)}")
    groups: dict[int, list[Workload]] = {}
    if cold_start:
        groups[1] = []  # the cold start runs in the one-thread worker
    for workload in workloads:
        groups.setdefault(workload.threads, []).append(workload)
    results = {"schema": SCHEMA, "quick": quick, "machine": machine.describe(), "implementations": names,
               "configs": [], "workers": [], "sgemm": {}, "weights_read": {}, "cold_start": None, "score": None}
    parts = []
    with tempfile.TemporaryDirectory(prefix="gru-engine-bench-") as directory:
        for threads, group in sorted(groups.items()):
            job = {"threads": threads, "quick": quick, "progress": progress, "implementations": names,
                   "workloads": [workload.to_dict() for workload in group], "workdir": str(Path(directory) / "models"),
                   "cold_start": cold_start and threads == 1}
            parts.append(_spawn_worker(job, Path(directory)))
        if score:
            results["score"] = score_bench.run(quick, Path(directory))
    measured = {config["name"]: config for part in parts for config in part["configs"]}
    results["configs"] = [measured[workload.name] for workload in workloads]
    for part in parts:
        results["workers"].append({"threads": part["threads"], "pinned": part["pinned"]})
        results["sgemm"][str(part["threads"])] = part["sgemm"]
        results["weights_read"][str(part["threads"])] = part["weights_read"]
        results["cold_start"] = part.get("cold_start") or results["cold_start"]
    results["targets"] = evaluate_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _select(patterns: str | None, catalogue: list[str]) -> list[str]:
    if not patterns:
        return []
    chosen = []
    for pattern in filter(None, (p.strip() for p in patterns.split(","))):
        matches = fnmatch.filter(catalogue, pattern)
        if not matches:
            raise ValueError(f"'{pattern}' matches none of: {', '.join(catalogue)}")
        chosen += [name for name in matches if name not in chosen]
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gru-engine bench",
        description="Compare gru-engine with onnxruntime, TensorFlow and Keras in one run: median and p10/p90 "
                    "latency, throughput, ratios, the project's performance targets; writes JSON and a PNG chart.",
        epilog="examples: gru-engine bench --quick | gru-engine bench --configs 'airline-*,cold-start' | "
               "gru-engine bench --model my.keras --steps 24")
    parser.add_argument("--quick", action="store_true", help="fewer workloads and shorter sampling (CI)")
    parser.add_argument("--configs", help="comma-separated workload names or patterns (see --list); "
                                          f"'{COLD_START}' is the fresh-process start-up timing")
    parser.add_argument("--impls", help="comma-separated implementation names (default: all)")
    parser.add_argument("--model", help="also benchmark your own .keras/.h5 model at batch 1 (alone unless "
                                        "--configs is given)")
    parser.add_argument("--steps", type=int, help="time steps per window for --model when its input does not fix T")
    parser.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png "
                                                          "(default ./bench-out)")
    parser.add_argument("--json", help="write the JSON here instead of OUT/bench.json")
    parser.add_argument("--chart", help="write the PNG chart here instead of OUT/bench.png")
    parser.add_argument("--list", action="store_true", help="list workloads and implementations, then exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        part = run_worker(json.loads(Path(args.worker).read_text()))
        write_json(part, args.worker_out)
        return 0
    catalogue = builtin_workloads(quick=False)
    if args.list:
        for workload in catalogue:
            print(f"{workload.name:<16} {workload.title}")
        print(f"{COLD_START:<16} a fresh `gru-engine predict` process vs `python -c 'import numba'`")
        print(f"{score_bench.SCORE:<16} {score_bench.ROWS:,} airline windows: Model.predict vs Dask on 1 and 2 "
              "workers (not in the default set; needs the dask extra)")
        print("implementations: " + ", ".join(IMPLEMENTATIONS))
        return 0
    names = [workload.name for workload in catalogue] + [COLD_START, score_bench.SCORE]
    chosen = _select(args.configs, names)
    if not chosen and not args.model:
        chosen = [workload.name for workload in builtin_workloads(args.quick)] + [COLD_START]
    workloads = [workload for workload in catalogue if workload.name in chosen]
    if args.model:
        workloads += user_workloads(args.model, args.steps)
    elif args.steps is not None:
        raise ValueError("--steps goes with --model")
    implementations = _select(args.impls, list(IMPLEMENTATIONS)) or None
    results = run_benchmarks(workloads, quick=args.quick, implementations=implementations,
                             cold_start=COLD_START in chosen, score=score_bench.SCORE in chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(results, args.json or out / "bench.json")
    chart_path = write_chart(results, args.chart or out / "bench.png")
    print(format_table(results))
    print(f"\nwrote {json_path} and {chart_path} ({results['elapsed_s']:.0f} s)")
    return 0
