"""Step-cadence logging: records in the user's units, evals on the step cadence, resumes."""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf

from funmatch_keras import loop, steplog


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
