"""Step-cadence logging: records in the user's units, evals on the step cadence, resumes."""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf

from funmatch_keras.training import loop, steplog


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data(step):
    return tf.data.Dataset.from_tensors((np.ones((4, 2)), np.ones((4, 1)))).repeat()


VALIDATION = tf.data.Dataset.from_tensors((np.ones((4, 2)), np.zeros((4, 1))))


def _run(tmp_path, model, start=0, verbose=0, epochs=5, **logger_args):
    path = str(tmp_path / "metrics.jsonl")
    logger = steplog.StepLogger(batch_size=4, steps_per_epoch=2, total_steps=2 * epochs,
                                metrics_path=path, validation_data=VALIDATION,
                                verbose=verbose, **logger_args)
    loop.fit_resumably(model, _data, steps_per_epoch=2, epochs=epochs, start_step=start,
                       log_every_steps=3, callbacks=[logger], verbose=0)
    return steplog.read_metrics(path), logger


def test_records_speak_in_steps_epochs_and_images(tmp_path, capsys):
    records, _ = _run(tmp_path, _model(), verbose=1, eval_every_steps=4,
                      tensorboard_dir=str(tmp_path / "tb"))
    # 10 steps of 2-step epochs, logged every 3 steps and at the end.
    assert [(r["step"], r["epoch"], r["images"], r["steps"]) for r in records] == [
        (3, 1.5, 12, 3), (6, 3.0, 24, 3), (9, 4.5, 36, 3), (10, 5.0, 40, 1)]
    # Evaluated at the first log step past 4 and 8, and at the end; not at epoch ends.
    assert [r["step"] for r in records if "val_loss" in r] == [6, 9, 10]
    assert [bool(r.get("warmup")) for r in records] == [True, False, False, False]
    assert all(r["train_s"] > 0 and r["images_per_s"] > 0 for r in records)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4
    assert lines[1].startswith("step 6/10 (epoch 3/5, 24 images): loss ")
    assert "val_loss" in lines[1] and "images/s" in lines[1]
    # TensorBoard scalars are written against the global step.
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    steps = set()
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        if any(v.tag == "loss" for v in event.summary.value):
            steps.add(event.step)
    assert steps == {3, 6, 9, 10}


def test_a_resume_keeps_each_step_once_and_the_wall_time_counting(tmp_path):
    model = _model()
    first, _ = _run(tmp_path, model, epochs=5)
    # As if killed at step 10 with the last checkpoint at step 6: restart there.
    model.optimizer.iterations.assign(6)
    records, logger = _run(tmp_path, model, start=6, epochs=5)
    assert [r["step"] for r in records] == [3, 6, 9, 10]
    assert logger.earlier_wall_time_s == first[1]["wall_time_s"]
    assert records[2]["wall_time_s"] >= first[1]["wall_time_s"]
    assert records[2].get("warmup")  # a new process: its first interval compiles


def test_no_evaluation_after_a_stop(tmp_path):
    class StopAtStep2(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 2:
                self.model.stop_training = True

    path = str(tmp_path / "metrics.jsonl")
    logger = steplog.StepLogger(batch_size=4, steps_per_epoch=2, total_steps=10,
                                metrics_path=path, validation_data=VALIDATION,
                                eval_every_steps=1, verbose=0)
    loop.fit_resumably(_model(), _data, steps_per_epoch=2, epochs=5, log_every_steps=3,
                       callbacks=[StopAtStep2(), logger], verbose=0)
    (record,) = steplog.read_metrics(path)
    assert record["step"] == 2 and "val_loss" not in record


def test_throughput_leaves_out_each_process_first_interval():
    history = [{"steps": 1, "train_s": 50.0, "warmup": True}, {"steps": 4, "train_s": 1.0},
               {"steps": 2, "train_s": 40.0, "warmup": True}, {"steps": 4, "train_s": 1.0}]
    assert steplog.throughput(history, batch_size=2) == 8.0
    # A one-interval run (one epoch of one log) still gets a figure.
    assert steplog.throughput([{"steps": 10, "train_s": 2.0, "warmup": True}], 2) == 10.0
    assert steplog.throughput([], batch_size=2) is None


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert steplog.read_metrics(str(path)) == [{"step": 1}]
    assert os.path.exists(path)


def test_evaluate_of_a_dataset_of_unknown_length_does_not_warn():
    import warnings

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    ds = tf.data.Dataset.from_tensors((np.ones((4, 2)), np.ones((4, 1)))).repeat(3)
    ds = ds.filter(lambda x, y: True)  # unknown cardinality, like eval_pipeline's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = steplog.evaluate(model, ds)
    assert "loss" in result
    assert not [w for w in caught if "ran out of data" in str(w.message)]


class _FakeClock(keras.callbacks.Callback):
    """A clock that moves `seconds_per_step` at each training step and nowhere else."""

    def __init__(self, seconds_per_step):
        super().__init__()
        self.now = 100.0
        self.seconds_per_step = seconds_per_step

    def __call__(self):
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        self.now += self.seconds_per_step


def test_eta_is_the_time_left_to_the_end_of_the_whole_run(tmp_path, capsys):
    clock = _FakeClock(0.5)
    path = str(tmp_path / "metrics.jsonl")
    logger = steplog.StepLogger(batch_size=4, steps_per_epoch=2, total_steps=10,
                                metrics_path=path, verbose=1, clock=clock)
    # The clock ticks before the logger reads it: the clock callback goes first.
    loop.fit_resumably(_model(), _data, steps_per_epoch=2, epochs=5, log_every_steps=3,
                       callbacks=[clock, logger], verbose=0)
    records = steplog.read_metrics(path)
    # By hand: 0.5 s a step. Step 3 (first interval, 1.5 s for 3 steps): 7 steps left
    # -> 3.5 s; later ones are timed from step 3 on: step 6 -> 4 x 0.5, step 9 -> 1 x 0.5,
    # step 10 -> nothing left. A Keras epoch (3 steps) would give 0 at every log step.
    assert [(r["step"], r["eta_s"]) for r in records] == [
        (3, 3.5), (6, 2.0), (9, 0.5), (10, 0.0)]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[0].endswith("8 images/s, ETA 4s") and lines[1].endswith("ETA 2s")
    assert steplog.eta_seconds(200, 2000, 100, 50.0) == 900.0
    assert steplog.eta_seconds(2000, 2000, 100, 50.0) == 0.0
    assert [steplog.format_duration(s) for s in (0, 59.6, 61, 3599, 3600, 90061)] == [
        "0s", "1m00s", "1m01s", "59m59s", "1h00m", "1d01h"]


def test_the_eta_counts_evaluation_time_after_the_first_interval(tmp_path):
    clock = _FakeClock(0.5)

    class SlowEvaluation(keras.callbacks.Callback):  # 3 s at each log step, before the logger
        def on_epoch_end(self, epoch, logs=None):
            clock.now += 3.0

    path = str(tmp_path / "metrics.jsonl")
    logger = steplog.StepLogger(batch_size=4, steps_per_epoch=2, total_steps=10,
                                metrics_path=path, verbose=0, clock=clock)
    loop.fit_resumably(_model(), _data, steps_per_epoch=2, epochs=5, log_every_steps=3,
                       callbacks=[clock, SlowEvaluation(), logger], verbose=0)
    records = steplog.read_metrics(path)
    # Step 3: the first interval's 1.5 s of steps + 3 s = 4.5 s for 3 steps, 7 left: 10.5.
    # Step 6: 1.5 + 3 = 4.5 s for the 3 steps since step 3, 4 left: 6.0.
    # Step 9: 9 s for 6 steps, 1 left: 1.5.
    assert [r["eta_s"] for r in records] == [10.5, 6.0, 1.5, 0.0]


def test_the_line_carries_the_latest_evaluation_until_the_next():
    record = {"step": 60, "epoch": 30.0, "images": 240, "loss": 0.25, "images_per_s": 80.0,
              "eta_s": 3720.0}
    line = steplog.progress_line(record, total_steps=100, steps_per_epoch=2,
                                 last_eval={"val_agreement": 0.875}, last_eval_step=40)
    assert line == ("step 60/100 (epoch 30/50, 240 images): loss 0.2500, 80 images/s, "
                    "ETA 1h02m | eval at step 40: val_agreement 0.8750")
    evaluated = dict(record, val_agreement=0.9)
    assert steplog.progress_line(evaluated, 100, 2, {"val_agreement": 0.875}, 40).endswith(
        "| eval at step 60: val_agreement 0.9000")
    assert "|" not in steplog.progress_line(record, 100, 2)


def test_a_short_run_keeps_the_keras_progress_bar_and_a_long_one_prints_lines(capsys):
    def run(total_steps):
        fit_verbose, log_verbose = steplog.progress_output(total_steps, verbose=1)
        logger = steplog.StepLogger(batch_size=4, steps_per_epoch=2, total_steps=total_steps,
                                    verbose=log_verbose)
        loop.fit_resumably(_model(), _data, steps_per_epoch=2, epochs=total_steps // 2,
                           log_every_steps=2, callbacks=[logger], verbose=fit_verbose)
        return capsys.readouterr().out

    assert steplog.SHORT_RUN_STEPS == 500
    short = run(4)
    assert "Epoch 2/2, steps 3-4 of 4" in short and "loss:" in short  # Keras's bar
    assert not [line for line in short.splitlines() if line.startswith("step ")]
    long_run = run(502)  # 251 intervals of 2 steps: one line each
    lines = [line for line in long_run.splitlines() if line.startswith("step ")]
    assert len(lines) == 251 and "Epoch " not in long_run
    assert lines[-1].startswith("step 502/502") and lines[-1].endswith("ETA 0s")
