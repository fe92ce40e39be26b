"""The teacher compute path: candidates, timing, the agreement guard, a run keeping its choice."""

import json
import os

import keras
import ml_dtypes
import numpy as np
import pytest

from funmatch_keras import models
from funmatch_keras.app import compute_path
from funmatch_keras.app import distill as train
from funmatch_keras.distiller import Distiller
from funmatch_keras.tuning import hardware, tune

FP32, BF16 = "float32", tune.BFLOAT16


def _dense(kernel: np.ndarray) -> keras.Model:
    model = keras.Sequential([keras.Input((kernel.shape[0],)),
                              keras.layers.Dense(kernel.shape[1], use_bias=False)])
    model.set_weights([kernel.astype(np.float32)])
    return model


def _distiller(teacher_kernel, seed=0):
    rng = np.random.default_rng(seed)
    student = _dense(rng.normal(size=teacher_kernel.shape))
    distiller = Distiller(_dense(teacher_kernel), student)
    distiller.compile(optimizer=keras.optimizers.Adam(0.1))
    return distiller


def _fake_timings(monkeypatch, ms_by_name):
    """Steps that take the given times: the choice must not depend on a noisy clock."""
    def run_step(distiller, x, y):
        distiller.train_on_batch(x, y)  # still trains, so the weights' restore is tested
        path = tune.TeacherPath(distiller.jit_compile, tune.dtype_of(distiller.teachers[0]),
                                distiller.teacher_jit_compile)
        return ms_by_name[path.name] / 1e3

    monkeypatch.setattr(tune, "_run_step", run_step)


def test_candidates_start_with_keras_auto_and_add_bf16_only_where_native():
    plain = tune.candidates(native_bfloat16=False)
    assert plain[0] == tune.default_path() == tune.TeacherPath(False, FP32)  # CPU: no XLA
    assert {p.name for p in plain} == {"no_xla_fp32_teacher", "teacher_xla_fp32_teacher",
                                       "step_xla_fp32_teacher"}
    native = tune.candidates(native_bfloat16=True)
    assert len(native) == 6 and {p.teacher_dtype for p in native} == {FP32, BF16}
    # A teacher that is not float32 is never "tuned" to another dtype.
    assert {p.teacher_dtype for p in tune.candidates(BF16, native_bfloat16=True)} == {BF16}


def test_no_xla_path_is_offered_under_op_determinism():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # conftest turns it off again
    paths = tune.candidates(native_bfloat16=True)
    assert [p.name for p in paths] == ["no_xla_fp32_teacher", "no_xla_bf16_teacher"]


def test_with_dtype_computes_in_bf16_from_the_same_weights():
    model = _dense(np.random.default_rng(0).normal(size=(8, 4)))
    copy = tune.with_dtype(model, BF16)
    assert copy.layers[-1].compute_dtype == "bfloat16"
    # Stored in bfloat16 (no per-step cast): the float32 weights, rounded once.
    assert copy.layers[-1].variable_dtype == "bfloat16"
    np.testing.assert_array_equal(
        np.asarray(copy.get_weights()[0], np.float32),
        model.get_weights()[0].astype(ml_dtypes.bfloat16).astype(np.float32))
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(copy(x), np.float32), model(x), rtol=0.05, atol=0.05)
    assert tune.with_dtype(model, FP32) is model


def test_a_bf16_teachers_logits_reach_the_loss_in_float32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    tuned = tune.apply(_distiller(rng.normal(size=(8, 4))), tune.TeacherPath(False, BF16))
    assert tuned.teachers[0].layers[-1].compute_dtype == "bfloat16"
    teacher_logits = tuned.teacher_logits(x)
    assert teacher_logits.dtype == "float32"
    # Exactly the bf16 teacher's outputs, widened: nothing rounds them again.
    np.testing.assert_array_equal(
        teacher_logits, np.asarray(tuned.teachers[0](x), np.float32))
    # The loss is T^2 KL(teacher || student) on those float32 logits (NumPy, T = 1).
    student_logits = np.asarray(tuned.student(x), np.float64)
    log_p = teacher_logits - np.log(np.exp(np.asarray(teacher_logits, np.float64)).sum(
        -1, keepdims=True))
    log_q = student_logits - np.log(np.exp(student_logits).sum(-1, keepdims=True))
    expected = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
    loss = tuned.compute_loss(x=x, y_pred=tuned.student(x))
    assert loss.dtype == "float32"
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_a_teacher_compiled_alone_gives_the_same_logits_and_trains():
    kernel = np.random.default_rng(0).normal(size=(8, 4))
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    plain = _distiller(kernel)
    compiled = tune.apply(plain, tune.TeacherPath(False, FP32, teacher_jit_compile=True))
    assert compiled.teacher_jit_compile and compiled.student is plain.student
    np.testing.assert_allclose(compiled.teacher_logits(x), plain.teacher_logits(x),
                               rtol=1e-5, atol=1e-5)
    assert compiled._compiled_teachers is not None and plain._compiled_teachers is None
    loss = compiled.train_on_batch(x)
    assert np.isfinite(loss)


def test_the_fastest_agreeing_path_wins_and_the_student_is_untouched(monkeypatch):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 4)) * 5  # large margins: bf16 keeps every top-1
    distiller = _distiller(kernel)
    before = [w.copy() for w in distiller.student.get_weights()]
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 30.0, "teacher_xla_fp32_teacher": 20.0,
                                "step_xla_fp32_teacher": 25.0, "no_xla_bf16_teacher": 40.0,
                                "teacher_xla_bf16_teacher": 10.0, "step_xla_bf16_teacher": 12.0})
    images = rng.normal(size=(256, 8)).astype(np.float32)
    result = tune.teacher_path(distiller, images[:16], [images[:128], images[128:]],
                               paths=tune.candidates(native_bfloat16=True), log=None)
    assert result.choice == tune.TeacherPath(False, BF16, teacher_jit_compile=True)
    rows = {r["path"]: r for r in result.table}
    assert rows["teacher_xla_bf16_teacher"]["agreement"] >= 0.995
    assert rows["teacher_xla_bf16_teacher"]["speedup"] == pytest.approx(3.0)
    assert "agreement" not in rows["step_xla_bf16_teacher"]  # slower: never checked
    for a, b in zip(distiller.student.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(distiller.optimizer.iterations) == 0


def test_a_bf16_teacher_that_flips_predictions_is_refused(monkeypatch):
    rng = np.random.default_rng(0)
    # Columns 1e-3 apart: bfloat16's 8-bit mantissa cannot tell them apart.
    base = rng.normal(size=(8, 1))
    kernel = base + 1e-3 * rng.normal(size=(8, 4))
    distiller = _distiller(kernel)
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 30.0, "teacher_xla_fp32_teacher": 40.0,
                                "step_xla_fp32_teacher": 25.0, "no_xla_bf16_teacher": 10.0,
                                "teacher_xla_bf16_teacher": 45.0, "step_xla_bf16_teacher": 50.0})
    images = rng.normal(size=(256, 8)).astype(np.float32)
    result = tune.teacher_path(distiller, images[:16], [images],
                               paths=tune.candidates(native_bfloat16=True), log=None)
    rows = {r["path"]: r for r in result.table}
    assert rows["no_xla_bf16_teacher"]["agreement"] < 0.995
    assert rows["no_xla_bf16_teacher"]["note"].startswith("refused: agreement")
    # Next fastest, XLA in float32, agrees and is kept.
    assert result.choice == tune.TeacherPath(True, FP32)
    assert rows["step_xla_fp32_teacher"]["agreement"] == 1.0


def test_agreement_teachers_stand_in_for_the_teachers_in_the_guard(monkeypatch):
    rng = np.random.default_rng(0)
    tiny_margins = rng.normal(size=(8, 1)) + 1e-3 * rng.normal(size=(8, 4))
    distiller = _distiller(tiny_margins)
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 30.0, "teacher_xla_fp32_teacher": 40.0,
                                "step_xla_fp32_teacher": 25.0, "no_xla_bf16_teacher": 10.0,
                                "teacher_xla_bf16_teacher": 45.0, "step_xla_bf16_teacher": 50.0})
    images = rng.normal(size=(256, 8)).astype(np.float32)
    proxy = _dense(rng.normal(size=(8, 4)) * 5)  # a trained teacher's large margins
    result = tune.teacher_path(distiller, images[:16], [images],
                               paths=tune.candidates(native_bfloat16=True),
                               agreement_teachers=[proxy], log=None)
    assert result.choice == tune.TeacherPath(False, BF16)
    assert {r["path"]: r for r in result.table}["no_xla_bf16_teacher"]["agreement"] >= 0.995


def test_a_path_within_noise_of_the_first_is_not_worth_a_switch(monkeypatch):
    distiller = _distiller(np.random.default_rng(0).normal(size=(8, 4)) * 5)
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 100.0, "no_xla_bf16_teacher": 97.0,
                                "teacher_xla_fp32_teacher": 96.0, "step_xla_fp32_teacher": 110.0,
                                "teacher_xla_bf16_teacher": 120.0, "step_xla_bf16_teacher": 130.0})
    images = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    paths = tune.candidates(native_bfloat16=True)
    result = tune.teacher_path(distiller, images, paths=paths, log=None)  # 1.04x at best
    assert result.choice == paths[0] == tune.TeacherPath(False, FP32)
    rows = {r["path"]: r for r in result.table}
    assert rows["teacher_xla_fp32_teacher"]["note"].startswith("not chosen: less than 1.05x")
    # With no margin asked, the fastest agreeing path wins as before.
    plain = tune.teacher_path(distiller, images, paths=paths, min_speedup=1.0, log=None)
    assert plain.choice == tune.TeacherPath(False, FP32, teacher_jit_compile=True)


def test_the_budget_stops_timing_after_the_first_candidate(monkeypatch):
    distiller = _distiller(np.random.default_rng(0).normal(size=(8, 4)))
    images = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    result = tune.teacher_path(distiller, images, budget_steps=0.0, log=None)
    assert result.choice == result.candidates[0]
    assert [r["ms"] is None for r in result.table] == [False] + [True] * (len(result.table) - 1)
    assert "budget" in tune.format_table(result)


def test_a_budget_buys_more_rounds_up_to_the_limit(monkeypatch):
    distiller = _distiller(np.random.default_rng(0).normal(size=(8, 4)))
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 300.0, "teacher_xla_fp32_teacher": 200.0,
                                "step_xla_fp32_teacher": 250.0})
    images = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    paths = tune.candidates(native_bfloat16=False)
    plain = tune.teacher_path(distiller, images, paths=paths, steps=2, log=None)
    assert [r["rounds"] for r in plain.table] == [2, 2, 2]
    rich = tune.teacher_path(distiller, images, paths=paths, steps=2, budget_steps=1e9, log=None)
    assert [r["rounds"] for r in rich.table] == [tune.MAX_ROUNDS] * 3


# -- a run's path: decided, tuned once, kept ------------------------------------


def test_decision_without_timing(smoke_config):
    config = smoke_config()
    decide = compute_path.decision
    short, why = decide(config, total_steps=100, num_replicas=1, resumed=False)
    assert short == tune.default_path() and why.startswith("run too short")
    # The demo's 1,520 steps (80 epochs x 19) are too short; the paper's runs are 10k and more.
    assert decide(config, 1_520, 1, False)[1].startswith("run too short")
    assert decide(config, 10_000, 1, False) == (None, "tuned")
    # The boundary: 2 candidates x (20 compile + 3 timed + 1) steps = 48 = 1.5% of 3,200
    # steps; so a Pets run of 1,000 epochs (about 6,500 steps at batch 512) is tuned.
    assert decide(config, 3_199, 1, False)[1].startswith("run too short")
    assert decide(config, 3_200, 1, False) == (None, "tuned")
    assert decide(config, 10_000, 2, False)[1] == "not tuned on 2 replicas"
    assert "resumed run without teacher_path.json" in decide(config, 10_000, 1, True)[1]
    # Short runs never write the file: a resumed one keeps its reason.
    assert decide(config, 100, 1, True) == (short, why)
    assert decide(smoke_config(teacher_path_budget=0.0), 10**9, 1, False)[0] == tune.default_path()
    fixed = decide(smoke_config(mode="fixed_teacher"), 10_000, 1, False)
    assert fixed[1].startswith("fixed teacher")
    explicit = decide(smoke_config(jit_compile=True, teacher_dtype="float32"), 10_000, 1, False)
    assert explicit == (tune.TeacherPath(True, FP32), "set in the config")
    # jit_compile alone is kept when the run is too short to tune the dtype.
    assert decide(smoke_config(jit_compile=True), 100, 1, False)[0].jit_compile is True


@pytest.mark.slow
def test_a_run_tunes_once_saves_the_choice_and_a_resume_keeps_it(tmp_path, monkeypatch,
                                                                 smoke_config):
    monkeypatch.setattr(hardware, "native_bfloat16", lambda: False)  # 3 candidates anywhere
    workdir = str(tmp_path / "run")
    teacher = str(tmp_path / "teacher.keras")
    models.build("cnn:8", 10, smoke_config().student_size).save(teacher)  # no label training
    config = smoke_config(epochs=60, eval_every_epochs=30, teacher=teacher, teacher_path_budget=0.9,
                     teacher_agreement_images=64)
    # Seconds-long steps: the budget (0.9 of the run's time) covers the real compiles.
    _fake_timings(monkeypatch, {"no_xla_fp32_teacher": 3000.0, "teacher_xla_fp32_teacher": 1000.0,
                                "step_xla_fp32_teacher": 2000.0})
    report = train.run(config, workdir, verbose=0)
    saved = json.load(open(os.path.join(workdir, "teacher_path.json")))
    assert saved["name"] == "teacher_xla_fp32_teacher" == report["teacher_path"]["name"]
    assert saved["note"] == "agreement on 64 images"
    assert [r["path"] for r in saved["table"]][0] == "no_xla_fp32_teacher"

    def no_tuning(*args, **kwargs):
        raise AssertionError("a run whose workdir holds teacher_path.json tuned again")

    monkeypatch.setattr(tune, "teacher_path", no_tuning)
    chosen = []
    original = tune.apply
    monkeypatch.setattr(tune, "apply", lambda d, p: chosen.append(p) or original(d, p))
    again = train.run(config, workdir, verbose=0)  # a finished run, resumed
    assert chosen == [tune.TeacherPath(False, FP32, teacher_jit_compile=True)]
    assert again["teacher_path"]["reason"] == "read from teacher_path.json"


def test_default_path_is_what_keras_auto_resolves_to():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(jit_compile="auto")
    assert tune.default_path().jit_compile is bool(model.jit_compile)
