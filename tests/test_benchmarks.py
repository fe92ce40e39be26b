"""Smoke tests of the benchmark scripts: their quickest mode, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(args: list[str], tmp_path, **env: str) -> str:
    """Runs `python *args` in `tmp_path`; returns its stdout, after checking it succeeded."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **env)
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _last_json_line(args: list[str], tmp_path) -> dict:
    stdout = _run_script(args, tmp_path)
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the script printed nothing"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_step_benchmark_quick(tmp_path):
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "step.py"), "--quick", "--repeats", "1",
         "--eval-images", "64", "--no-profile", "--trained-epochs", "1",
         "--variants", "matmul_fp32_1024,matmul_bf16_1024,keras_distiller,ours_fp32"],
        tmp_path)
    for key in ("speedup_vs_keras_distillation", "agreement_fast_vs_fp32",
                "fp32_peak_fraction", "flops_per_step", "peak_gflops", "results",
                "speedup_default_vs_keras", "speedup_tuned_vs_keras", "cpu_flags"):
        assert key in report
    # funmatch distill's two paths are always measured, the tuned one named by its path.
    assert report["tuned_variant"].startswith("ours_tuned:")
    assert 0.0 <= report["tuned_agreement"] <= 1.0
    trained = report["trained_teacher"]
    assert set(trained["by_teacher_config"]) >= {"float32_xla"}
    assert trained["median_margin"] > 0 and 0 <= trained["test_top1"] <= 1
    assert report["speedup_vs_keras_distillation"] > 0
    assert 0.0 <= report["agreement_fast_vs_fp32"] <= 1.0
    assert report["fp32_peak_fraction"] > 0
    assert report["flops_per_step"] > report["flops_teacher_forward"] > 0
    names = {row["variant"] for row in report["results"]}
    assert {"keras_distiller", "ours_fp32"} <= names
    assert report["workload"] == "quick" and report["chosen_path"] in report["tuned_variant"]


@pytest.mark.slow
def test_step_benchmark_workload_quick_runs_only_the_comparison(tmp_path):
    # `--workload W --quick` on tiny models (--teacher/--student/--size still apply).
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "step.py"), "--workload", "pets", "--quick",
         "--teacher", "cnn:8", "--student", "cnn:4", "--size", "16", "--batch", "4",
         "--repeats", "1", "--trained-epochs", "1"], tmp_path)
    assert report["workload"] == "pets" and report["quick"] is True
    names = {row["variant"].split(":")[0] for row in report["results"]}
    assert names == {"matmul_fp32_1024", "matmul_bf16_1024", "keras_distiller",
                     "ours_default", "ours_tuned"}
    assert report["baseline"] == "keras_distiller"
    assert report["tuned_variant"] == f"ours_tuned:{report['chosen_path']}"
    assert 0.0 <= report["chosen_path_trained_agreement"] <= 1.0
    assert report["agreement_measured_on"] == "label-trained teacher"
    fastest = next(r for r in report["results"] if r["variant"] == report["fastest_variant"])
    assert report["agreement_fast_vs_fp32"] == fastest["trained_teacher_agreement"]
    assert report["agreement_fast_vs_fp32_random_head"] == fastest["teacher_agreement"]


def test_teacher_dtype_benchmark_on_a_small_cnn(tmp_path):
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "teacher_dtype.py"), "--teacher", "cnn:8",
         "--size", "16", "--batch", "2", "--rounds", "2"], tmp_path)
    assert set(report["ms"]) == {"float32", "mixed_bfloat16", "bfloat16"}
    assert report["speedup_vs_float32"]["float32"] == 1.0
    assert report["max_abs_logit_diff"]["float32"] == 0.0
    # bf16 rounds, but a random 3-layer CNN's logits stay close to float32's.
    assert 0.0 < report["max_abs_logit_diff"]["bfloat16"] < 0.5


@pytest.mark.slow
def test_paper_findings_quick(tmp_path):
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "paper_findings.py"), "--quick",
         "--teacher-epochs", "1", "--workdir", str(tmp_path)],
        tmp_path)
    modes = {"fixed_teacher", "independent", "consistent", "function_matching"}
    assert {cell["mode"] for cell in report["cells"]} == modes
    assert {cell["epochs"] for cell in report["cells"]} == {1, 2}
    for cell in report["cells"]:
        for key in ("test_top1", "agreement", "train_loss", "train_kl_clean"):
            assert 0.0 <= cell[key] < float("inf"), (cell["mode"], key)
    assert "function_matching_best_at_long" in report["findings"]
    assert os.path.exists(report["png"])


@pytest.mark.slow
@pytest.mark.heavy  # 100 s on 2 cores: out of CI's 30 minutes (pytest -m heavy)
def test_shampoo_benchmark_quick(tmp_path):
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "shampoo.py"), "--quick",
         "--workdir", str(tmp_path)], tmp_path)
    for key in ("epochs_ratio", "wall_ratio", "step_overhead", "comparisons",
                "digits_steps", "overhead_model", "runs"):
        assert key in report
    assert report["step_overhead"] > 0
    assert {row["optimizer"] for row in report["runs"]} == {"adamw", "shampoo"}
    for row in report["runs"]:
        assert 0.0 <= row["agreement"] <= 1.0 and row["train_s"] > 0
    for steps in (report["digits_steps"], report["overhead_model"]):
        assert steps["shampoo"]["root_step_median_ms"] > 0
        assert steps["adamw"]["root_step_median_ms"] is None


def test_shampoo_benchmark_overhead_only(tmp_path):
    # The optimizer-overhead mode on a tiny CNN: steps 2..7 timed, roots at 2, 4, 6.
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "shampoo.py"), "--overhead-only",
         "--overhead-model", "cnn:8,16", "--overhead-size", "16", "--overhead-batch", "4",
         "--overhead-rounds", "6", "--statistics-every", "3", "--precondition-every", "2",
         "--start-preconditioning-step", "2"], tmp_path)
    assert report["statistics_every"] == 3
    steps = report["overhead_model"]
    assert report["step_overhead"] == steps["amortized_ratio"] > 0
    assert steps["shampoo"]["steps"] == steps["adamw"]["steps"] == 6
    assert steps["shampoo"]["root_step_median_ms"] > 0
    assert steps["adamw"]["root_step_median_ms"] is None
    assert (steps["model"], steps["size"], steps["batch"]) == ("cnn:8,16", 16, 4)


def test_shampoo_benchmark_plot(tmp_path, monkeypatch):
    import importlib.util

    import numpy as np

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # its `import common`

    spec = importlib.util.spec_from_file_location(
        "shampoo_benchmark", os.path.join(ROOT, "benchmarks", "shampoo.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"optimizer": "adamw", "epochs": 4, "agreement_curve": [0.2, 0.5, 0.8, 0.9]},
            {"optimizer": "adamw", "epochs": 4, "agreement_curve": [0.3, 0.6, 0.7, 0.95]},
            {"optimizer": "shampoo", "epochs": 2, "agreement_curve": [0.6, 0.92]}]
    path = bench.plot_agreement(rows, str(tmp_path / "curves.png"), "test")
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 640) and np.ptp(image) > 0  # drawn, not blank


@pytest.mark.slow
def test_loop_benchmark_quick(tmp_path):
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "loop.py"), "--steps", "4", "--repeats", "1",
         "--structures", "2", "--student", "cnn:8,16", "--batch-size", "8"], tmp_path)
    assert set(report) == {"ratio_2", "checkpoint_s", "checkpoint_blocking_s"}
    assert report["ratio_2"] > 0 and report["checkpoint_s"] > 0
    assert report["checkpoint_blocking_s"] > 0


def test_demo_seeds_summary_and_reference_literal(monkeypatch):
    """demo_seeds.py's mean ± std and gaps, and the REFERENCE it prints for demo.py."""
    import ast
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # its `import common`
    spec = importlib.util.spec_from_file_location(
        "demo_seeds", os.path.join(ROOT, "benchmarks", "demo_seeds.py"))
    demo_seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_seeds)

    def report(teacher, label, distilled):
        return {"results": {
            "teacher": {"top1": teacher, "agreement": 1.0, "params": 9},
            "label-trained student": {"top1": label, "agreement": 0.9, "params": 3},
            "distilled student": {"top1": distilled, "agreement": 0.95, "params": 3}}}

    summary = demo_seeds.summarize([report(0.99, 0.96, 0.98), report(0.98, 0.97, 0.975)])
    assert summary["distilled student"]["top1_mean"] == pytest.approx(0.9775)
    assert summary["label-trained student"]["top1_std"] == pytest.approx(0.00707, abs=1e-5)
    assert summary["gap_mean"] == pytest.approx(0.0125)  # (0.02 + 0.005) / 2
    assert summary["gap_min"] == pytest.approx(0.005)
    literal = demo_seeds.reference_literal(summary, [0, 1], "a CPU")
    name, value = literal.split(" = ", 1)
    reference = ast.literal_eval(value)
    assert name == "REFERENCE" and reference["machine"] == "a CPU"
    assert reference["gap"] == (0.0125, 0.005)
    assert reference["top1"]["distilled student"] == (0.9775, 0.00354)
    assert f"{os.cpu_count()} cores" in demo_seeds.machine()


@pytest.mark.slow
def test_sweep_benchmark_small_models(tmp_path):
    # The --quick code path on tiny models: a live and a replayed sweep, their ratios.
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "sweep.py"), "--teacher", "cnn:8", "--student",
         "cnn:4", "--size", "16", "--batch", "4", "--steps", "4"], tmp_path)
    for key in ("live_s", "store_s", "sweep_ratio", "replay_run_ratio", "first_run_overhead",
                "first_run_overhead_ahead", "bytes_per_step", "max_abs_weight_diff",
                "rerun_max_abs_weight_diff", "student_step_in_memory_s", "replayed_input_s",
                "cpu_flags"):
        assert key in report
    assert report["bytes_per_step"] == 4 * 10 * 4
    assert report["stored_bytes_per_step"] >= report["bytes_per_step"]
    # The recording run and the replayed one train as the live run does.
    assert report["max_abs_weight_diff"] <= report["rerun_max_abs_weight_diff"]
    assert report["recorded_run_max_abs_weight_diff"] <= report["rerun_max_abs_weight_diff"]
    assert len(report["replayed_runs_s"]) == len(report["live_runs_s"]) == 4
    # The sweep: the recording run, then the other three temperatures replayed.
    assert report["store_s"] == pytest.approx(
        report["recording_run_s"] + sum(report["replayed_runs_s"][1:]), abs=0.03)


@pytest.mark.slow
@pytest.mark.heavy  # 7-9 min on 2 shared cores, mostly XLA compiling BiT-R152x2 (pytest -m heavy)
def test_gpu_check_quick_times_the_papers_pair(tmp_path):
    # The CPU smoke of the GPU check (JAX backend; timm parity skipped): parts (b) and (c).
    out = tmp_path / "gpu_check.json"
    stdout = _run_script(
        [os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--quick", "--skip-parity",
         "--out", str(out)], tmp_path, KERAS_BACKEND="jax")
    report = json.loads(out.read_text())
    assert report["ok"] is True and stdout.splitlines()[-1].startswith("summary: OK")
    assert report["tensorflow_imported_by_funmatch_keras"] is False
    assert report["environment"]["backend"] == "jax" and report["skipped"] == []
    assert {(r["batch"], r["policy"]) for r in report["throughput"]} == {
        (4, "float32"), (4, "mixed_bfloat16")}
    rows = report["pair"]
    assert [(r["batch"], r["policy"]) for r in rows] == [
        (2, "float32"), (2, "mixed_bfloat16")]
    for row in rows:
        assert (row["teacher"], row["teacher_size"]) == ("bit_r152x2", 48)
        assert (row["student"], row["student_size"]) == ("bit_r50x1", 32)
        live, replayed = row["live"], row["replayed"]
        for timing in (live, replayed):
            # A warm-up window and 2 timed ones, each ending on a finite loss.
            assert len(timing["losses"]) == 3 and timing["finite"]
            assert all(0 < loss < float("inf") for loss in timing["losses"])
            assert len(timing["window_step_ms"]) == 2
            assert timing["median_step_ms"] > 0
            assert timing["images_per_s"] == pytest.approx(2e3 / timing["median_step_ms"])
        ratio = replayed["median_step_ms"] / live["median_step_ms"]
        assert row["replay_over_live"] == pytest.approx(ratio)
        assert row["teacher_share"] == pytest.approx(1.0 - ratio)
        key = f"{row['policy']} batch 2"
        assert report["pair_teacher_share"][key] == pytest.approx(1.0 - ratio, abs=5e-4)


@pytest.mark.slow
def test_store_encodings_benchmark_quick(tmp_path):
    # --quick with two encodings: their stores, the KL against float32's, a student each.
    report = _last_json_line(
        [os.path.join(ROOT, "benchmarks", "store_encodings.py"), "--quick", "--encodings",
         "bfloat16,top2", "--workdir", str(tmp_path)], tmp_path)
    assert report["quick"] is True and report["classes"] == 10 and report["students"] is True
    rows = {row["encoding"]: row for row in report["encodings"]}
    assert list(rows) == ["float32", "bfloat16", "top2"]
    for row in rows.values():
        for key in ("stored_bytes_per_step", "kl_mean_t1", "kl_max_t1", "kl_mean_t10",
                    "kl_max_t10", "agreement", "max_abs_logit_diff", "student_test_top1",
                    "student_agreement"):
            assert key in row, (row["encoding"], key)
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["student_agreement"] <= 1.0
    batch = report["batch"]  # bytes per example: 4 C, 2 C, 4 (2K + 1)
    assert [row["bytes_per_step"] for row in rows.values()] == [
        batch * 4 * 10, batch * 2 * 10, batch * 4 * 5]
    # float32 is the reference itself: read back exactly.
    assert rows["float32"]["kl_max_t1"] == 0.0 and rows["float32"]["max_abs_logit_diff"] == 0.0
    assert "cpu_flags" in report["machine"]
