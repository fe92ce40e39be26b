"""What a teacher store's cheaper encodings cost: KL and agreement against float32.

On the bundled digits with the `digits` config (teacher `cnn:32,64,128` trained
with labels for `--teacher-epochs`, function matching with mixup, batch 64,
10 classes), the trained teacher's float32 logits of every step of a
`--epochs` run are taken from the very pipeline `funmatch distill` feeds
(`build.pipeline_kwargs`), as `funmatch teacher-store` records them. Each
encoding (`--encodings`) gets a store of its own, written from those logits;
its logits are read back (decoded to float32) and compared with float32's:

- `bytes_per_step`: the encoded logits of one step (batch x per-example bytes),
  and `stored_bytes_per_step`: the chunk files on disk over the steps;
- `kl_mean_t<T>`, `kl_max_t<T>`: KL(p_float32 || p_encoded) per example, at
  the temperatures T of the paper (1, 2, 5, 10), in nats;
- `agreement`: top-1 of the decoded logits equal to float32's;
- `max_abs_logit_diff`: the largest |decoded - float32| logit.

Then (unless `--no-students`) one student per store, float32 included, is
distilled by replaying it (`TeacherStore.replay`), from the same initialization
with op determinism on, and its test top-1 and test agreement with the teacher
are reported (`student_test_top1`, `student_agreement`): what the encoding's
error does to the student.

Usage:
    python benchmarks/store_encodings.py --quick   # 1 teacher epoch, 1-epoch students: ~40 s
    python benchmarks/store_encodings.py           # 20 teacher epochs, 60-epoch students: 9 min

The machine line comes first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from funmatch_keras import configs  # noqa: E402
from funmatch_keras.app import build  # noqa: E402
from funmatch_keras.app import train_teacher as supervised  # noqa: E402
from funmatch_keras.data import pipelines as data  # noqa: E402
from funmatch_keras.data.sources import digits_source  # noqa: E402
from funmatch_keras.data.teacher_store import (  # noqa: E402
    TeacherStore,
    encoded_layout,
    fingerprint,
    teacher_function,
)
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.optim import optimizers as optim  # noqa: E402
from funmatch_keras.training import distribute  # noqa: E402
from funmatch_keras.training.steplog import predict_classes  # noqa: E402

TEMPERATURES = (1, 2, 5, 10)


def log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """KL(p_reference || p_decoded) per example at each T, top-1 agreement, max |diff|."""
    reference = reference.reshape(-1, reference.shape[-1])
    decoded = decoded.reshape(reference.shape)
    row = {}
    for t in TEMPERATURES:
        log_p, log_q = log_softmax(reference, t), log_softmax(decoded, t)
        kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        row[f"kl_mean_t{t}"] = float(kl.mean())
        row[f"kl_max_t{t}"] = float(kl.max())
    row["agreement"] = float(np.mean(reference.argmax(-1) == decoded.argmax(-1)))
    row["max_abs_logit_diff"] = float(np.max(np.abs(reference - decoded)))
    return row


def write_store(directory: str, encoding: str, logits: np.ndarray,
                settings: dict) -> TeacherStore:
    """A store of `encoding` holding `logits` (`[steps, batch, classes]`), chunk by chunk."""
    steps, batch, classes = logits.shape
    store = TeacherStore.open(directory, settings, num_classes=classes, batch_size=batch,
                              encoding=encoding)
    for chunk in store.chunks(0, steps):
        first = chunk * store.steps_per_chunk
        store.write_chunk(chunk, logits[first:first + store.steps_per_chunk])
    return store


def distill(store: TeacherStore, teacher, config, make_dataset, steps_per_epoch: int,
            epochs: int, initial: list, test: tuple, jit: bool) -> dict[str, float]:
    """A student distilled by replaying `store` (`teacher` never runs); its test scores."""
    total = steps_per_epoch * epochs
    student = build.student(config, store.num_classes)
    student.set_weights(initial)
    distiller = Distiller(teacher, student, temperature=config.temperature)
    distiller.compile(optimizer=optim.adamw(config.lr, config.weight_decay, total,
                                            min(config.warmup_steps, total - 1)),
                      jit_compile=jit)
    start = time.time()
    distiller.fit(store.replay(make_dataset(0), 0, total), steps_per_epoch=steps_per_epoch,
                  epochs=epochs, verbose=0)
    images, labels, teacher_classes = test
    predicted = predict_classes(student, images)
    return {"student_test_top1": float(np.mean(predicted == labels)),
            "student_agreement": float(np.mean(predicted == teacher_classes)),
            "student_train_s": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 teacher epoch, 1-epoch students, no XLA")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the recorded run, the students' schedule "
                        "(default: the digits config's 60)")
    parser.add_argument("--encodings", default="float16,bfloat16,top1,top3,top5")
    parser.add_argument("--no-students", action="store_true",
                        help="measure the logits only, distill no student")
    parser.add_argument("--workdir", help="the teacher and the stores (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.teacher_epochs, args.epochs = 1, 1
    jit = False if args.quick else build.jit_compile(None)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    print(common.machine_line(), flush=True)
    tf.config.experimental.enable_op_determinism()

    overrides = {"teacher_epochs": str(args.teacher_epochs)}
    if args.epochs:
        overrides["epochs"] = str(args.epochs)
    config = configs.apply_overrides(configs.load_config("digits"), overrides)
    configs.validate(config)
    workdir = args.workdir or tempfile.mkdtemp(prefix="store_encodings_")
    source, test_source = digits_source("train"), digits_source("test")
    classes = source.num_classes
    keras.utils.set_random_seed(config.seed)
    supervised.train_missing_teachers(config, workdir, source,
                                      distribute.replication("default"), verbose=0)
    (teacher,) = build.teachers(config, classes, workdir)
    images, labels = next(iter(data.eval_pipeline(
        test_source, size=config.student_size,
        batch_size=test_source.num_examples).as_numpy_iterator()))
    teacher_classes = predict_classes(teacher, images)
    teacher_top1 = float(np.mean(teacher_classes == labels))

    def make_dataset(step):  # the batches `funmatch distill` and the store see
        return data.train_pipeline(source, **build.pipeline_kwargs(config, source,
                                                                  start_step=step))

    steps_per_epoch = build.steps_per_epoch(config, source)
    steps = steps_per_epoch * config.epochs
    compute = teacher_function(Distiller(teacher, build.student(config, classes)))
    start = time.time()
    batches = iter(make_dataset(0))
    reference = np.stack([keras.ops.convert_to_numpy(compute(next(batches)))
                          for _ in range(steps)]).astype(np.float32)
    print(f"teacher {config.teacher} ({args.teacher_epochs} epochs with labels): test top-1 "
          f"{teacher_top1:.4f}; its logits of {steps} steps x {config.batch_size} "
          f"({config.mode}, T={config.temperature}) in {time.time() - start:.1f} s", flush=True)

    keras.utils.set_random_seed(config.seed + 1)
    initial = build.student(config, classes).get_weights()  # every student starts here
    settings = fingerprint([teacher], seed=config.seed, batch_size=config.batch_size)
    rows = []
    for encoding in ["float32", *encodings]:
        store = write_store(os.path.join(workdir, f"store_{encoding}"), encoding, reference,
                            settings)
        decoded = np.stack(list(store.logits_from(0, steps)))
        dtype, width = encoded_layout(encoding, classes)
        stored = sum(os.path.getsize(os.path.join(store.directory, name))
                     for name in os.listdir(store.directory) if name.endswith(".npy"))
        row = {"encoding": encoding, "bytes_per_step": config.batch_size * width * dtype.itemsize,
               "stored_bytes_per_step": round(stored / steps, 1), **compare(reference, decoded)}
        if not args.no_students:
            row.update(distill(store, teacher, config, make_dataset, steps_per_epoch,
                               config.epochs, initial, (images, labels, teacher_classes), jit))
        rows.append(row)
        print(f"{encoding:>9}: {row['bytes_per_step']:>6} B/step, KL mean/max T=1 "
              f"{row['kl_mean_t1']:.2e}/{row['kl_max_t1']:.2e}, T=10 {row['kl_mean_t10']:.2e}/"
              f"{row['kl_max_t10']:.2e}, agreement {row['agreement']:.4f}, max |dlogit| "
              f"{row['max_abs_logit_diff']:.3g}"
              + ("" if args.no_students else
                 f"; student test top-1 {row['student_test_top1']:.4f}, agreement "
                 f"{row['student_agreement']:.4f}"), flush=True)

    common.print_result({
        "quick": args.quick, "dataset": "digits", "teacher": config.teacher,
        "teacher_epochs": args.teacher_epochs, "teacher_test_top1": teacher_top1,
        "student": config.student, "mode": config.mode, "batch": config.batch_size,
        "classes": classes, "steps": steps, "examples": steps * config.batch_size,
        "temperatures": list(TEMPERATURES), "students": not args.no_students,
        "epochs": config.epochs, "jit_compile": jit,
        "encodings": rows, "machine": common.machine(),
    })


if __name__ == "__main__":
    main()
