"""One test for any `models.build` spec, in the spirit of keras-hub's
`run_vision_backbone_test` and timm's tests over `list_models()`.

`run_model_spec_test(spec, tmp_path)` checks what the package does with every
model, whatever its family:

1. `build` gives `(batch, num_classes)` float32 logits for
   `(batch, size, size, 3)` images;
2. a `.keras` round trip (loaded with `safe_mode=True`) keeps the layer classes
   and the outputs;
3. one `Distiller` step with the model as the frozen teacher and a fresh one as
   the student: the loss is finite, the student's weights move, the teacher's
   (all of them, moving statistics included) do not. A model of more than
   `MAX_STUDENT_PARAMS` teaches a small CNN instead: training it takes about
   six times its weights' memory under weight standardization (10.6 GB for
   BiT-R50x3 at 32 px), and such models are teachers in the recipe;
4. under `mixed_bfloat16` the layers compute in bfloat16 and the logits stay
   float32 (and finite). Their distance to the float32 logits is not checked:
   with random weights it grows with depth (20% of the logits' scale for
   BiT-R50x1 at 64 px), so only checkpoint-loaded tests pin it;
5. SavedModel export (`model.export(path, format="tf_saved_model")`),
   reloaded with `tf.saved_model.load`, gives the same outputs.

Checks 2, 4 and 5, and training the model as a student, exercise a builder's
layers and their configs, which the larger members of a family (the same
builder with more blocks or channels) share with its smallest member: with
`family_checks=False` a spec gets checks 1 and 3 only, as the teacher of
`SMALL_STUDENT`, its role in the recipe.

The Distiller step runs last, as it freezes the model it is given. The model
is freed once both files are written, each file is read back and deleted in
turn, and weights are compared by digest, so at most two copies of a model
are live at once and the disk holds at most one. TensorFlow does not give a
freed model's memory back, though (BiT-R152x4 still peaks at 20 GB), so
`run_model_spec_test_in_subprocess` runs it all in a process of its own (forked
from one that has imported TensorFlow), whose memory is returned when it ends.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings

import keras
import numpy as np
import tensorflow as tf

from funmatch_keras import models
from funmatch_keras.distiller import Distiller

# Above this, the Distiller step's student is `SMALL_STUDENT`, not a copy of the model.
MAX_STUDENT_PARAMS = 100_000_000
SMALL_STUDENT = "cnn:8,16"

# Smallest input some Keras applications accept (keras.applications checks it).
_MIN_SIZES = {"keras:InceptionV3": 75, "keras:InceptionResNetV2": 75, "keras:Xception": 71}


def image_size_for(spec: str, size: int = 32) -> int:
    """`size`, or the smallest input the model accepts when that is larger."""
    return max(size, _MIN_SIZES.get(spec, 0))


def _numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def _max_error(actual, expected, tol: float) -> tuple[float, bool]:
    """The largest |difference|, and whether it is within `tol` of the outputs' scale."""
    actual, expected = _numpy(actual), _numpy(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float(np.abs(actual - expected).max())
    return error, error <= tol * (1.0 + np.abs(expected).max())


def _assert_close(actual, expected, tol: float, what: str) -> None:
    error, close = _max_error(actual, expected, tol)
    assert close, f"{what}: max |diff| {error}"


def _give_zero_kernels_values(model: keras.Model, seed: int) -> keras.Model:
    """Random values for all-zero kernels (BiT's zero head), so outputs differ."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        value = keras.ops.convert_to_numpy(variable)
        if value.ndim >= 2 and not value.any():
            variable.assign(rng.normal(0.0, 0.05, value.shape).astype(value.dtype))
    return model


def _digests(model: keras.Model) -> list[bytes]:
    """One digest per weight: exact comparison without a second copy of the model."""
    return [hashlib.blake2b(keras.ops.convert_to_numpy(w).tobytes()).digest()
            for w in model.weights]


def run_model_spec_test(spec: str, tmp_path, num_classes: int = 3,
                        image_size: int = 32, batch: int = 2,
                        run_eagerly: bool = True, family_checks: bool = True) -> None:
    """Runs the five checks of the module docstring on `models.build(spec, ...)`.

    Args:
        spec: str. A `models.build` spec, e.g. from `models.list_models()`.
        tmp_path: a directory for the `.keras` file and the SavedModel.
        num_classes: int. Logits. Defaults to 3.
        image_size: int. Input side, raised to what the model accepts
            (`image_size_for`). Defaults to 32.
        batch: int. Images in the batch. Defaults to 2.
        run_eagerly: bool. For the Distiller step. Defaults to True.
        family_checks: bool. Whether to run checks 2, 4 and 5 and train the
            model as a student (see the module docstring). Defaults to True.
    """
    size = image_size_for(spec, image_size)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    model = _give_zero_kernels_values(models.build(spec, num_classes, size), seed=1)

    # 1. Logits.
    logits = model(images, training=False)
    assert tuple(logits.shape) == (batch, num_classes) and logits.dtype == "float32", (
        logits.shape, logits.dtype)
    assert np.all(np.isfinite(_numpy(logits)))
    reference = _numpy(logits)
    layer_types = [type(layer) for layer in model.layers]

    if family_checks:
        # Both files are written from the model, which is then freed: each is read
        # back with no other copy of the weights in memory.
        keras_path = os.path.join(str(tmp_path), "model.keras")
        export_dir = os.path.join(str(tmp_path), "saved_model")
        model.save(keras_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(export_dir, format="tf_saved_model", verbose=False)
        del model, logits
        gc.collect()

        # 5. SavedModel export (compared once the model is back, below).
        loaded = tf.saved_model.load(export_dir)
        served = _numpy(loaded.serve(tf.constant(images)))
        del loaded
        gc.collect()
        shutil.rmtree(export_dir)

        # 2. .keras round trip. The restored model serves the checks below.
        model = keras.saving.load_model(keras_path, safe_mode=True)
        os.remove(keras_path)
        assert [type(layer) for layer in model.layers] == layer_types
        _assert_close(model(images, training=False), reference, 1e-6, ".keras round trip")
        error, close = _max_error(served, reference, 1e-5)
        if not close:
            # The SavedModel runs the traced graph. A deep network with random weights
            # can be chaotic (EfficientNetV2L's logits reach 5e4, and its eager logits
            # for one image change with the batch), so graph and eager kernels, which
            # round apart, give other logits: then it must match the model traced here.
            traced = tf.function(lambda x: model(x, training=False))(tf.constant(images))
            _assert_close(served, traced, 1e-5,
                          f"SavedModel (max |diff| {error:.3g} to eager, then to the traced model)")

        # 4. mixed_bfloat16, same weights.
        half = models.build(spec, num_classes, size, dtype="mixed_bfloat16")
        for target, source in zip(half.weights, model.weights, strict=True):
            target.assign(source)  # same structure, float32 variables; no NumPy copy
        weighted = [layer for layer in half.layers if layer.weights]
        assert all(layer.compute_dtype == "bfloat16" for layer in weighted[:-1]), [
            layer.name for layer in weighted[:-1] if layer.compute_dtype != "bfloat16"]
        half_logits = half(images, training=False)
        assert half_logits.dtype == "float32" and np.all(np.isfinite(_numpy(half_logits)))
        del half
        gc.collect()

    # 3. One Distiller step: the model teaches a fresh copy of itself (or a small
    # CNN: when it is too big to train here, or a larger member of its family).
    student_spec = (spec if family_checks and model.count_params() <= MAX_STUDENT_PARAMS
                    else SMALL_STUDENT)
    student = _give_zero_kernels_values(models.build(student_spec, num_classes, size), seed=2)
    teacher_before, student_before = _digests(model), _digests(student)
    distiller = Distiller(model, student, temperature=2.0)
    # Eager: tracing the step of two BiT-R50x1 takes ~70 s on 2 CPU cores, and
    # the forward graph is traced by the export above; tests/test_distiller.py
    # covers the traced step itself.
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=run_eagerly)
    history = distiller.fit(images, epochs=1, batch_size=batch, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss), loss  # ~0 where random logits are near uniform (VGG16)
    assert _digests(model) == teacher_before, "a teacher weight changed"
    moved = [a != b for a, b in zip(student_before, _digests(student), strict=True)]
    assert any(moved), "no student weight changed"
    trainable = {id(v) for v in distiller.trainable_variables}
    assert trainable == {id(v) for v in student.trainable_variables}


class _SpecServer:
    """A process that has imported TensorFlow and forks a child per spec.

    Each spec still runs in a process of its own, whose memory goes back when it
    ends, but none imports TensorFlow again. The server runs no TensorFlow op
    itself, so every child starts from a just-imported state.
    """

    def __init__(self):
        self.process = None

    def run(self, spec: str, tmp_path, family_checks: bool,
            timeout_s: float) -> tuple[int, str]:
        """The child's exit code and its output (stdout and stderr)."""
        if self.process is not None and self.process.poll() is not None:
            self.stop()  # it died: a new one
        if self.process is None:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self.errors = tempfile.TemporaryFile("w+", errors="replace")  # the server's own
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.model_harness", "--serve"], cwd=root,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
                start_new_session=True)  # its own process group, with its children
        log = os.path.join(str(tmp_path), "harness.log")
        self.process.stdin.write(json.dumps({"spec": spec, "dir": str(tmp_path), "log": log,
                                             "family_checks": family_checks}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        reply = self.process.stdout.readline() if ready else ""
        output = ""
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                output = f.read()
        if not reply:  # timed out, or the server died: start a new one next time
            self.errors.seek(0)
            server = self.errors.read()[-2000:]
            self.stop()
            return -1, (f"{output}\n(no result after {timeout_s} s, or the server died)"
                        f"\n--- the server's stderr ---\n{server}")
        return int(reply), output

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and a running child
            self.process.wait()
        for f in (self.process.stdin, self.process.stdout, self.errors):
            f.close()
        self.process = None


_SERVER = _SpecServer()


def run_model_spec_test_in_subprocess(spec: str, tmp_path, family_checks: bool = True,
                                      timeout_s: float = 900) -> None:
    """`run_model_spec_test` in a process of its own (forked; see `_SpecServer`).

    TensorFlow keeps the memory of a freed model: one pytest worker that built
    the larger specs in turn grew past 20 GB. A process per spec gives it back.
    """
    code, output = _SERVER.run(spec, tmp_path, family_checks, timeout_s)
    assert code == 0, f"{spec}: exit {code}\n{output[-4000:]}"


def stop_subprocesses() -> None:
    """Ends the process that `run_model_spec_test_in_subprocess` forks from."""
    _SERVER.stop()


def _serve() -> None:
    """Reads one JSON request a line; forks a child for each; writes its exit code."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                run_model_spec_test(request["spec"], request["dir"],
                                    family_checks=request["family_checks"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # no atexit handlers: they belong to the server
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":  # python -m tests.model_harness (SPEC DIR [--teacher-only] | --serve)
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        run_model_spec_test(sys.argv[1], sys.argv[2],
                            family_checks="--teacher-only" not in sys.argv[3:])
