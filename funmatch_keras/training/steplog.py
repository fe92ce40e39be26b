"""Training logs at a step cadence: evaluation, metrics.jsonl, TensorBoard, a progress line.

`loop.fit_resumably` runs Keras `fit` over "virtual epochs" of one log
interval each, so Keras's epoch end is our log step. `StepLogger` turns it
back into the user's units: the global step, dataset epochs (fractional: the
paper's Flowers102 epoch is 2 steps) and images seen. It evaluates when an
evaluation is due (not when a dataset epoch ends), writes one JSON line per
interval and TensorBoard scalars against the global step, and prints one line.
Metrics are read from the device only here, once per interval.

Each record holds `step`, `epoch`, `images`, the interval's training metrics
(means over the interval, as Keras resets them at each virtual epoch), any
`val_*` metrics, `learning_rate`, `steps` and `train_s` (the interval's length
and its training time, evaluation excluded), and `wall_time_s`, counted across
resumes, and `eta_s`, the time left to the end of the whole run (`eta_seconds`).
The first interval of each process holds the compilation and is marked
`"warmup": true`; `throughput` and the ETA leave it out once there is more.

The printed line (`progress_line`) is for long runs, where a Keras progress bar
would only cover one log interval; a run of at most `SHORT_RUN_STEPS` steps keeps
Keras's own bar instead (`progress_output`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable

import keras
import numpy as np
from absl import logging

from funmatch_keras import atomic
from funmatch_keras.optim.optimizers import global_step


class StepCadence(keras.callbacks.Callback):
    """A callback acting at log steps, on a cadence of the global step.

    `loop.fit_resumably` makes Keras's epoch ends the log steps; the global step
    is the optimizer's `iterations`, so cadences survive restarts. Subclasses
    call `_advance` at each epoch end and test `crossed_multiple`.
    """

    def __init__(self, *, steps_per_epoch: int | None, total_steps: int | None,
                 clock: Callable[[], float]):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.clock = clock
        self._step = 0

    def on_train_begin(self, logs=None):
        self._step = global_step(self.model.optimizer)

    def _advance(self) -> tuple[int, int]:
        """`(previous, step)`: the log step before this one, and this one."""
        previous, self._step = self._step, global_step(self.model.optimizer)
        return previous, self._step


class StepLogger(StepCadence):
    """Logs every virtual epoch (one log interval) of `loop.fit_resumably` in user units.

    Args:
        batch_size: int. Global batch size (images per step).
        steps_per_epoch: int. Steps of one pass over the training data.
        total_steps: int. Steps of the whole run (for the progress line).
        metrics_path: str or None. The JSON-lines file appended to.
        tensorboard_dir: str or None. Where TensorBoard scalars go.
        validation_data: a dataset for `model.evaluate`, or None.
        eval_every_steps: int or None. Evaluate at the first log step at or past
            each multiple of it, and at the end of the run.
        verbose: int. 0: silent; 1: one line per log step (`progress_line`:
            step, epoch, images/s, ETA of the run, loss, the latest evaluation).
        clock: callable returning seconds (tests inject one). Defaults to
            `time.monotonic`.

    Example:
    >>> import tempfile, numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> logger = StepLogger(batch_size=2, steps_per_epoch=4, total_steps=8, metrics_path=path,
    ...                     verbose=0)
    >>> _ = model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=2, epochs=2, verbose=0,
    ...               callbacks=[logger])
    >>> [(r["step"], r["epoch"], r["images"]) for r in read_metrics(path)]
    [(4, 1.0, 8), (8, 2.0, 16)]
    """

    def __init__(
        self,
        *,
        batch_size: int,
        steps_per_epoch: int,
        total_steps: int,
        metrics_path: str | None = None,
        tensorboard_dir: str | None = None,
        validation_data: Any = None,
        eval_every_steps: int | None = None,
        verbose: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(steps_per_epoch=steps_per_epoch, total_steps=total_steps, clock=clock)
        if eval_every_steps is not None and eval_every_steps < 1:
            raise ValueError(f"`eval_every_steps` must be >= 1 or None. "
                             f"Received: eval_every_steps={eval_every_steps!r}")
        self.batch_size = batch_size
        self.metrics_path = metrics_path
        self.tensorboard_dir = tensorboard_dir
        self.validation_data = validation_data
        self.eval_every_steps = eval_every_steps
        self.verbose = verbose
        self._writer = None
        self._mark = 0.0
        self._wall_offset = 0.0
        self._warmup = True  # the first interval of this process holds compilation
        self._started: float | None = None
        # Where the ETA's timing starts: the end of this process's first interval.
        self._eta_mark: tuple[float, int] | None = None
        self._last_eval: dict[str, float] = {}
        self._last_eval_step: int | None = None

    @property
    def earlier_wall_time_s(self) -> float:
        """Wall time logged by earlier processes of this run (0 for a fresh run)."""
        return self._wall_offset

    def on_train_begin(self, logs=None):
        # `fit_resumably` may call `fit` up to three times in one run.
        super().on_train_begin(logs)
        self._mark = self.clock()
        if self._started is not None:
            return
        self._started = self._mark
        if self.metrics_path:
            # A run killed after its last checkpoint logged steps it will train
            # again: drop them, so the file has each step once.
            records = read_metrics(self.metrics_path)
            kept = [r for r in records if r["step"] <= self._step]
            if len(kept) < len(records):
                atomic.write_text(self.metrics_path,
                                  "".join(json.dumps(r) + "\n" for r in kept))
            if kept:
                self._wall_offset = kept[-1].get("wall_time_s", 0.0)
        if self.tensorboard_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        train_s = self.clock() - self._mark
        previous, step = self._advance()
        steps = step - previous
        if self._evaluation_due(previous, step):
            results = evaluate(self.model, self.validation_data)
            logs.update({f"val_{k}": float(v) for k, v in results.items()})
            self._last_eval = {f"val_{k}": float(v) for k, v in results.items()}
            self._last_eval_step = step
        optimizer = self.model.optimizer
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        record = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "images": step * self.batch_size,
            **{k: float(v) for k, v in logs.items()},
            "steps": steps,
            "train_s": round(train_s, 4),
            "images_per_s": round(steps * self.batch_size / train_s, 2) if train_s > 0 else 0.0,
            "wall_time_s": round(self._wall_offset + self.clock() - self._started, 2),
        }
        now = self.clock()
        # Wall time per step (evaluations included) since the first interval of this
        # process, which compiles; until there is more, that interval's own.
        since, since_step = self._eta_mark or (now - train_s, previous)
        if step > since_step:
            record["eta_s"] = round(eta_seconds(step, self.total_steps, step - since_step,
                                                now - since), 1)
        if self._warmup:
            record["warmup"] = True
            self._warmup = False
            self._eta_mark = (now, step)
        self._write(record)
        self._mark = self.clock()

    def _evaluation_due(self, previous: int, step: int) -> bool:
        if self.validation_data is None or self.model.stop_training:
            return False  # a NaN or a preemption signal: stop fast
        every = self.eval_every_steps or self.steps_per_epoch
        return crossed_multiple(previous, step, every) or step >= self.total_steps

    def _write(self, record: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in _NOT_SCALARS}
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=record["step"]):
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
            self._writer.flush()
        if self.verbose:
            print(progress_line(record, self.total_steps, self.steps_per_epoch,
                                self._last_eval, self._last_eval_step), flush=True)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


# Bookkeeping fields of a record, not metrics.
_NOT_SCALARS = ("step", "epoch", "images", "steps", "train_s", "wall_time_s", "warmup",
                "eta_s")
# Runs of at most this many steps keep Keras's progress bar (`progress_output`).
SHORT_RUN_STEPS = 500


def progress_output(total_steps: int, verbose: int) -> tuple[int, int]:
    """`(fit_verbose, logger_verbose)`: Keras's bar for a short run, our line for a long one.

    A short run (at most `SHORT_RUN_STEPS` steps: smoke runs, quick
    experiments) shows Keras's own progress bar, one per log interval, headed
    by the run's epoch and steps (`loop.RunProgress`); a longer one prints
    `progress_line` once per log interval instead, with the ETA of the whole
    run, which a bar over one interval cannot give.

    Example:
    >>> progress_output(400, verbose=1), progress_output(6000, verbose=1)
    ((1, 0), (0, 1))
    >>> progress_output(400, verbose=0)
    (0, 0)
    """
    if not verbose:
        return 0, 0
    return (verbose, 0) if total_steps <= SHORT_RUN_STEPS else (0, verbose)


def crossed_multiple(previous: int, step: int, every: int) -> bool:
    """Whether a multiple of `every` lies in `(previous, step]`: a cadence is due.

    Callbacks act at log steps, which need not fall on multiples of `every`,
    so the test is `//` rather than `%`.

    Example (log steps 4, 8, 12 against a cadence of 6):
    >>> [crossed_multiple(p, s, every=6) for p, s in ((0, 4), (4, 8), (8, 12))]
    [False, True, True]
    """
    return step // every > previous // every


def eta_seconds(step: int, total_steps: int, steps_timed: int,
                seconds_timed: float) -> float:
    """Seconds left to `total_steps`, at the pace of `steps_timed` steps in `seconds_timed`.

    Example (100 steps took 50 s, so 0.5 s a step; 1,800 steps are left):
    >>> eta_seconds(200, 2000, steps_timed=100, seconds_timed=50.0)
    900.0
    """
    if steps_timed <= 0:
        raise ValueError(f"steps_timed must be >= 1. Received: steps_timed={steps_timed}")
    return max(0, total_steps - step) * seconds_timed / steps_timed


def format_duration(seconds: float) -> str:
    """A duration as the two largest units: `2d04h`, `1h02m`, `3m05s`, `42s`.

    Example:
    >>> [format_duration(s) for s in (42, 185, 3720, 187200)]
    ['42s', '3m05s', '1h02m', '2d04h']
    """
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def progress_line(record: dict, total_steps: int, steps_per_epoch: int,
                  last_eval: dict | None = None, last_eval_step: int | None = None) -> str:
    """One log record as a line: step, epoch, images, training metrics, images/s, ETA
    of the whole run, then the latest evaluation (this step's, or an earlier one's).

    Example:
    >>> line = progress_line({"step": 40, "epoch": 20.0, "images": 20480, "loss": 0.5,
    ...                       "images_per_s": 5120.0, "eta_s": 185.0}, total_steps=400,
    ...                      steps_per_epoch=2, last_eval={"val_agreement": 0.75},
    ...                      last_eval_step=30)
    >>> for part in line.split(" | "):
    ...     print(part)
    step 40/400 (epoch 20/200, 20,480 images): loss 0.5000, 5,120 images/s, ETA 3m05s
    eval at step 30: val_agreement 0.7500
    """
    epochs = total_steps / steps_per_epoch
    quiet = (*_NOT_SCALARS, "learning_rate", "images_per_s")
    parts = [f"{k} {v:.4f}" for k, v in record.items()
             if k not in quiet and not k.startswith("val_")]
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:,.0f} images/s")
    if "eta_s" in record:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    line = (f"step {record['step']}/{total_steps} (epoch {record['epoch']:g}/{epochs:g}, "
            f"{record['images']:,} images): " + ", ".join(parts))
    evaluated = {k: v for k, v in record.items() if k.startswith("val_")}
    at = record["step"]
    if not evaluated and last_eval:
        evaluated, at = last_eval, last_eval_step
    if evaluated:
        line += f" | eval at step {at}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in evaluated.items())
    return line


def evaluate(model: keras.Model, dataset) -> dict[str, float]:
    """`model.evaluate(dataset)` as a dict, without Keras's "ran out of data" warning.

    Keras warns whenever a dataset of unknown length ends, which is how every
    evaluation ends when corrupt images may be dropped (`data.eval_pipeline`).

    Example:
    >>> import numpy as np, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(loss="mse")
    >>> evaluate(model, tf.data.Dataset.from_tensors((np.zeros((4, 2)), np.zeros((4, 1)))))
    {'loss': 0.0}
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        results = model.evaluate(dataset, verbose=0, return_dict=True)
    return {k: float(v) for k, v in results.items()}


def predict_classes(model: keras.Model | list[keras.Model], images: np.ndarray,
                    batch_size: int = 256) -> np.ndarray:
    """Top-1 classes of a model, or of an ensemble (a list: logits averaged, as distilled)."""
    models = model if isinstance(model, (list, tuple)) else [model]
    logits = [np.asarray(m.predict(images, batch_size=batch_size, verbose=0)) for m in models]
    return np.mean(logits, axis=0).argmax(-1)


class TestSetTracker(keras.callbacks.Callback):
    """Test top-1 of `student`, and its agreement with the teacher, at epoch ends.

    For curves over a short run held in memory (the demo, the benchmarks);
    `StepLogger` is the logger of long runs.

    Args:
        student: `keras.Model` scored (not the one `fit` trains: e.g. `distiller.student`).
        images: array of test images.
        labels: array of their classes.
        teacher_classes: array of the teacher's top-1 classes on `images`.
        every: int. Score every `every` epochs, and at `epochs`. Defaults to 1.
        epochs: int or None. The run's last epoch. Defaults to None.

    Attributes:
        points: one dict per scoring: `epoch`, the epoch's training `loss`,
            `test_top1` and `agreement`.

    Example:
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> tracker = TestSetTracker(model, x, np.array([0, 1]), predict_classes(model, x))
    >>> _ = model.fit(x, np.zeros((2, 2)), epochs=2, verbose=0, callbacks=[tracker])
    >>> [p["epoch"] for p in tracker.points], len(tracker.top1)
    ([1, 2], 2)
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, student: keras.Model, images: np.ndarray, labels: np.ndarray,
                 teacher_classes: np.ndarray, every: int = 1, epochs: int | None = None):
        super().__init__()
        self.student, self.images, self.labels = student, images, labels
        self.teacher_classes, self.every, self.epochs = teacher_classes, every, epochs
        self.points: list[dict] = []

    @property
    def top1(self) -> list[float]:
        return [p["test_top1"] for p in self.points]

    @property
    def agreement(self) -> list[float]:
        return [p["agreement"] for p in self.points]

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.epochs:
            return
        predictions = predict_classes(self.student, self.images)
        self.points.append({
            "epoch": done, "loss": float((logs or {}).get("loss", np.nan)),
            "test_top1": float(np.mean(predictions == self.labels)),
            "agreement": float(np.mean(predictions == self.teacher_classes)),
        })


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (empty if there is none).

    A last line cut short by a kill is skipped, with a log line.
    """
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("Skipping unreadable line %d of %s.", number, path)
    return records


def throughput(history: list[dict], batch_size: int) -> float | None:
    """Training images/s over the logged intervals, leaving out each process's first.

    The first interval of a process holds its compilation; when it is all
    there is (a one-interval run), it is used. Evaluation time is never counted.

    Example:
    >>> throughput([{"steps": 1, "train_s": 9.0, "warmup": True},
    ...             {"steps": 10, "train_s": 2.0}], batch_size=4)
    20.0
    """
    timed = [r for r in history if "train_s" in r]
    steady = [r for r in timed if not r.get("warmup")] or timed
    seconds = sum(r["train_s"] for r in steady)
    if not steady or seconds <= 0:
        return None
    return round(sum(r["steps"] for r in steady) * batch_size / seconds, 1)
