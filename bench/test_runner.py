"""The comparison runner end to end (one tiny workload), and the pieces its report is computed from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gru_engine.bench import report, runner, timing
from gru_engine.bench.registry import IMPLEMENTATIONS
from gru_engine.bench.workloads import (AIRLINE_B1, AIRLINE_CHUNKS, AIRLINE_STEP, CAUSAL_CONV_STEP, GFLOP_CASE,
                                        GUITAR_B1, LSTM_AIRLINE_B1, LSTM_AIRLINE_STEP, TRANSFORM_CASES, Recipe,
                                        Workload, builtin_workloads, user_workloads)
from gru_engine.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_table_json_and_chart(tmp_path, capsys):
    status = runner.main(["--quick", "--configs", f"{AIRLINE_B1},cold-start", "--impls", "engine,ort-native,tf-xla",
                          "--out", str(tmp_path)])
    assert status == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_MAGIC)

    assert results["machine"]["cores"] >= 1 and results["machine"]["versions"]["numpy"] == np.__version__
    assert [worker["pinned"]["numba"] for worker in results["workers"]] == [1]
    [config] = results["configs"]
    assert config["name"] == AIRLINE_B1 and config["threads"] == 1
    engine = config["implementations"]["engine"]
    assert engine["status"] == "ok" and engine["ratio"] == 1.0 and engine["agrees"]
    assert engine["p10_s"] <= engine["median_s"] <= engine["p90_s"]
    assert engine["throughput_per_s"] == pytest.approx(1 / engine["median_s"])
    for name, entry in config["implementations"].items():
        assert name in ("engine", "ort-native", "tf-xla")
        if entry["status"] == "ok":
            assert entry["ratio"] == pytest.approx(entry["median_s"] / engine["median_s"])
            assert f"{entry['ratio']:.2f}x" in table
        else:
            assert entry["note"] and entry["note"] in table

    cold = results["cold_start"]
    assert cold["difference_s"] == pytest.approx(cold["predict_s"] - cold["import_numba_s"])
    assert {target["number"] for target in results["targets"]} == set(range(1, 12))
    assert "the project's performance targets, measured in this run" in table
    assert f"[gru-engine bench --configs {AIRLINE_B1}]" in table and "ratio = peer time / gru-engine time" in table


def test_transform_and_chunk_workloads_time_what_their_targets_compare(tmp_path, capsys):
    configs = ",".join((*TRANSFORM_CASES, AIRLINE_CHUNKS))
    assert runner.main(["--quick", "--configs", configs, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())
    measured = {config["name"]: config["implementations"] for config in results["configs"]}
    assert set(measured[TRANSFORM_CASES[0]]) == {"engine", "engine-untransformed"}
    assert set(measured[TRANSFORM_CASES[1]]) == {"engine-stream", "engine-stream-untransformed"}
    chunks = measured[AIRLINE_CHUNKS]
    assert set(chunks) == ({"engine-stream", "c-export-stream"}
                           | {f"engine-run-{c}" for c in (1, 16, 64, 256, 4096)})
    # Every chunked stream's first step (and the exported C's) is the stream's first step; a chunk is
    # timed per step.
    assert all(entry["status"] == "ok" and entry["agrees"] for entry in chunks.values())
    assert chunks["engine-run-4096"]["median_s"] < 100 * chunks["engine-stream"]["median_s"]
    judged = [target for target in results["targets"] if target["verdict"] != "n/a"]
    assert {target["number"] for target in judged} == {8, 9, 11}
    for target in judged:
        assert target["verdict"] in ("PASS", "MISS") and f"{target['measured']:.3g}x" in table


def test_workloads_name_the_implementations_they_time():
    workloads = {workload.name: workload for workload in builtin_workloads()}
    named_only = [impl for impl in IMPLEMENTATIONS.values() if impl.named_only]
    assert named_only and not any(workloads[AIRLINE_B1].runs(impl) for impl in named_only)
    assert workloads[AIRLINE_B1].runs(IMPLEMENTATIONS["ort-native"])
    assert not workloads[AIRLINE_CHUNKS].runs(IMPLEMENTATIONS["ort-native-stream"])
    assert Workload.from_dict(workloads[AIRLINE_CHUNKS].to_dict()) == workloads[AIRLINE_CHUNKS]


def _results(ratios: dict[tuple[str, str], float], cold_difference=None) -> dict:
    configs = {}
    for (config, peer), ratio in ratios.items():
        configs.setdefault(config, {"name": config, "implementations": {}})
        configs[config]["implementations"][peer] = {"status": "ok", "ratio": ratio, "median_s": ratio * 1e-5}
    return {"configs": list(configs.values()),
            "cold_start": None if cold_difference is None else {"difference_s": cold_difference}}


def test_targets_are_judged_from_the_measurements():
    verdicts = report.evaluate_targets(_results({(AIRLINE_B1, "ort-native"): 2.5, (AIRLINE_B1, "tf-xla"): 12.0,
                                                 (GFLOP_CASE, "ort-native"): 1.5}, cold_difference=0.7))
    by_what = {(v["number"], v["what"].split(": ")[-1]): v for v in verdicts}
    assert by_what[1, "ort-native / engine"]["verdict"] == "PASS"
    assert by_what[1, "tf-xla / engine"]["verdict"] == "MISS" and by_what[1, "tf-xla / engine"]["measured"] == 12.0
    assert by_what[1, "ort-tf2onnx / engine"]["verdict"] == "n/a"
    assert [v["verdict"] for v in verdicts if v["number"] == 2] == ["n/a"]
    assert [v["verdict"] for v in verdicts if v["number"] == 3] == ["PASS"]  # the bound is inclusive
    assert [v["verdict"] for v in verdicts if v["number"] == 4] == ["MISS"]
    assert {v["verdict"] for v in verdicts if v["number"] in (8, 9)} == {"n/a"}


def test_cost_targets_bound_one_time_by_another():
    verdicts = report.evaluate_targets(_results({
        (TRANSFORM_CASES[0], "engine"): 1.0, (TRANSFORM_CASES[0], "engine-untransformed"): 1 / 1.1,
        (TRANSFORM_CASES[2], "engine"): 1.0, (TRANSFORM_CASES[2], "engine-untransformed"): 0.8,
        (AIRLINE_CHUNKS, "engine-stream"): 1.0, (AIRLINE_CHUNKS, "engine-run-1"): 1.3,
        (AIRLINE_CHUNKS, "engine-run-16"): 0.5, (AIRLINE_CHUNKS, "engine-run-4096"): 0.45}))
    transforms = [v["verdict"] for v in verdicts if v["number"] == 8]
    assert transforms == ["PASS", "n/a", "MISS"]  # the bound is inclusive; the stream was not measured
    assert [v["verdict"] for v in verdicts if v["number"] == 9] == ["PASS", "MISS"]
    assert [v["number"] for v in verdicts] == sorted(v["number"] for v in verdicts)


def test_front_end_and_c_export_targets_are_judged_too():
    verdicts = report.evaluate_targets(_results({
        (GUITAR_B1, "ort-native"): 2.3, (CAUSAL_CONV_STEP, "ort-native-stream"): 1.5,
        (AIRLINE_STEP, "engine-stream"): 1.0, (AIRLINE_STEP, "c-export-stream"): 0.25,
        (AIRLINE_CHUNKS, "engine-run-256"): 0.2, (AIRLINE_CHUNKS, "c-export-stream"): 0.21}))
    assert [v["verdict"] for v in verdicts if v["number"] == 10] == ["PASS", "MISS"]
    c_export = [v for v in verdicts if v["number"] == 11]
    assert [v["verdict"] for v in c_export] == ["PASS", "MISS"]
    assert c_export[0]["measured"] == pytest.approx(0.25) and c_export[1]["measured"] == pytest.approx(1.05)


def test_lstm_targets_are_judged_on_the_lstm_workloads():
    verdicts = report.evaluate_targets(_results({(LSTM_AIRLINE_B1, "ort-native"): 1.9,
                                                 (LSTM_AIRLINE_STEP, "ort-native-stream"): 4.5}, cold_difference=None))
    by_number = {v["number"]: v for v in verdicts}
    assert by_number[5]["verdict"] == "MISS" and by_number[5]["measured"] == 1.9
    assert by_number[6]["verdict"] == "n/a"
    assert by_number[7]["verdict"] == "PASS" and "stream" in by_number[7]["what"]


def test_round_robin_times_every_call_and_reports_a_broken_one():
    def broken():
        raise RuntimeError("session lost")

    budget = timing.Budget(sample_s=0.0005, slice_s=0.002, seconds=0.02, min_rounds=3, max_rounds=50, warm_up_s=0)
    samples, failures = timing.round_robin({"sum": lambda: sum(range(100)), "broken": broken}, budget)
    assert failures == {"broken": "RuntimeError: session lost"}
    assert len(samples["sum"]) >= 3 and all(s > 0 for s in samples["sum"])
    stats = timing.summarize(samples["sum"])
    assert stats["p10_s"] <= stats["median_s"] <= stats["p90_s"]


def test_gru_flops_count_each_layer(tmp_path):
    pytest.importorskip("keras")
    from gru_engine.exporters import read_keras
    spec = read_keras(Recipe("two", 3, (8, 4)).build())
    assert runner.gru_flops_per_step(spec) == 2 * 3 * 8 * (3 + 8) + 2 * 3 * 4 * (8 + 4)


def test_user_model_needs_a_window_length(tmp_path):
    pytest.importorskip("keras")
    path = tmp_path / "free_time.keras"
    Recipe("free", 2, (4,)).build().save(path)
    with pytest.raises(InputError, match="--steps"):
        user_workloads(path)
    window, step = user_workloads(path, steps=12)
    assert (window.steps, window.batch, window.recipe.features, step.per_step) == (12, 1, 2, True)
    assert Workload.from_dict(window.to_dict()) == window


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="matches none of"):
        runner.main(["--configs", "airline-b7"])
    with pytest.raises(ValueError, match="matches none of"):
        runner.main(["--impls", "cuda"])


def test_the_weights_floor_is_a_read_of_the_given_size_and_is_shown_per_step():
    budget = timing.Budget(sample_s=0.0005, slice_s=0.002, seconds=0.02, min_rounds=3, max_rounds=50, warm_up_s=0)
    read = timing.weights_read(64 << 10, budget)
    assert read["bytes"] == 64 << 10 and read["gb_per_s"] == pytest.approx(read["bytes"] / read["median_s"] / 1e9)
    results = {"configs": [{"name": GFLOP_CASE, "threads": 1, "implementations": {
                   "engine": {"median_s": 6e-3}, "ort-native": {"median_s": 9e-3}}}],
               "weights_read": {"1": {"bytes": 786432, "median_s": 4e-6, "gb_per_s": 196.6}}}
    line = report._weights_line(results)
    assert "768 KiB" in line and "4 us" in line and "engine 6 us, ort-native 9 us" in line
    assert "1.5x ort-native needs 6 us" in line
