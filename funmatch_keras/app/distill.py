"""`funmatch distill`: a config → a distilled student in a workdir, resumable after any kill.

`run(config, workdir)` is what `funmatch distill` and the notebooks call: it
builds data, teacher(s), student and optimizer from the config (`build`),
trains with labels first any teacher that has no weights (`supervised`),
restores the last checkpoint of the workdir if there is one, runs
`Distiller.fit`, and writes the student, metrics and report (layout: `workdir`).
Teachers are frozen and never checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import keras
import ml_collections

from funmatch_keras import configs
from funmatch_keras.app import build, compute_path
from funmatch_keras.app import teacher_store as teacher_store_run
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import teacher_cache
from funmatch_keras.distiller import Distiller
from funmatch_keras.training import distribute, loop, steplog
from funmatch_keras.training.checkpoint import CheckpointManager


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        verbose: int = 1, strategy: Any = None) -> dict[str, Any]:
    """Distills a student as the config says, resuming from the workdir's checkpoints.

    Models, optimizer and `Distiller` are built and trained inside the
    replication scope (`distribute.replication`); `config.batch_size` is the
    global batch, split over the replicas. Under multi-worker training the
    workers share `workdir` or each have their own: only the chief writes
    checkpoints, the trained teacher, reports and `student.keras` there; the
    others write their student and logs to `workdir/workertemp_<task>/`. What
    the chief's workdir holds decides for all: on a resume each worker gets the
    chief's teacher and checkpoint state from the chief, never from a disk.

    Args:
        config: `ml_collections.ConfigDict` from `funmatch_keras.configs`.
        workdir: str. Where checkpoints, logs, the student and the report go.
        overwrite: bool. Start from nothing in a workdir that holds a run (the old
            run is moved aside, then deleted). Defaults to False.
        verbose: int. Keras verbosity. Defaults to 1.
        strategy: a `tf.distribute.Strategy`, a kind for `distribute.replication`
            (`"auto"`, `"mirrored"`, `"multi_worker"`, `"tpu"`, `"default"`; JAX:
            `"auto"`, `"data_parallel"`, `"default"`) or None: the
            `FUNMATCH_STRATEGY` environment variable, else `"auto"`.

    Returns:
        The report dict (also written to `workdir/report.json`).

    Example:
    >>> report = run(configs.load_config("digits:smoke=True"), "/tmp/fm")  # doctest: +SKIP
    """
    configs.validate(config)
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
    replicas = distribute.replication(strategy)
    distribute.check_batch_size(config.batch_size, replicas.num_replicas)
    if config.teacher_store:  # before the workdir is written or a teacher trained
        teacher_store_run.check_supported(config, replicas.num_workers)
    if verbose and replicas.num_replicas > 1:
        print(f"Training on {replicas.num_replicas} replicas ({replicas.kind}, "
              f"{replicas.task}).", flush=True)
    # Non-chief workers keep their own files apart; checkpoints are the chief's.
    shared_workdir = workdir
    checkpoint_dir = os.path.join(workdir, workdirs.CHECKPOINTS)
    if not replicas.is_chief:
        workdir = distribute.worker_dir(workdir, replicas.task)
    with workdirs.started(shared_workdir, config, overwrite, replicas, prepared=workdir):
        start = time.time()
        keras.utils.set_random_seed(config.seed)
        if config.deterministic and keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        train_source = build.source(config, "train")
        # Outside the scope: it enters it to train, and saves outside it.
        trained = supervised.train_missing_teachers(config, workdir, train_source, replicas,
                                                    verbose)
        with replicas.scope():
            return _run(config, workdir, checkpoint_dir, replicas, verbose, start,
                        train_source, trained)


def _run(config, workdir, checkpoint_dir, replicas, verbose, start, train_source,
         trained) -> dict[str, Any]:
    num_classes = build.num_classes(config, train_source)
    teachers = build.teachers(config, num_classes, workdir, trained)
    student = build.student(config, num_classes)
    steps_per_epoch = build.steps_per_epoch(config, train_source)
    cadence = configs.cadence(config, steps_per_epoch)
    total_steps = cadence.total_steps
    distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                          temperature=config.temperature)
    distiller.compile(optimizer=build.optimizer(config, total_steps),
                      jit_compile=build.jit_compile(config.jit_compile),
                      steps_per_execution=config.steps_per_execution)

    teacher_size = configs.teacher_sizes(config)
    val_source = build.source(config, "validation")
    val_ds = data.eval_pipeline(val_source, size=config.student_size,
                                batch_size=config.eval_batch_size, teacher_size=teacher_size)
    metrics_path = workdirs.metrics_path(workdir)
    # Short runs: Keras's progress bar; long ones: a line per log interval with the ETA.
    fit_verbose, log_verbose = steplog.progress_output(total_steps, verbose)
    logger = steplog.StepLogger(
        batch_size=config.batch_size, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        metrics_path=metrics_path, tensorboard_dir=os.path.join(workdir, "tensorboard"),
        validation_data=val_ds, eval_every_steps=cadence.eval_every_steps,
        verbose=log_verbose)
    fixed_logits = None
    if config.mode == "fixed_teacher":  # computed once, cached in the workdir
        fixed_logits = teacher_cache.teacher_logits(train_source, teachers[0], teacher_size,
                                                    workdir)

    make_dataset = build.train_datasets(config, train_source, replicas, verbose,
                                        teacher_logits=fixed_logits)

    done_steps = (os.path.isdir(checkpoint_dir)
                  and CheckpointManager(checkpoint_dir, clean_temp=False).all_steps())

    def choose():
        return compute_path.choose(
            config, distiller, workdir, total_steps=total_steps,
            num_replicas=replicas.num_replicas, is_chief=replicas.is_chief,
            resumed=bool(done_steps), sample_batch=lambda: next(iter(make_dataset(0))),
            agreement_data=lambda: compute_path.agreement_dataset(config, val_source,
                                                                  teacher_size),
            verbose=verbose)

    if config.teacher_store:  # the teacher's logits, recorded once for a sweep
        store, distiller, teacher_path = teacher_store_run.for_config(
            config, distiller, train_source, num_classes, choose=choose,
            num_workers=replicas.num_workers)
        serving = teacher_store_run.serve(store, distiller, make_dataset,
                                          max(done_steps or [0]), total_steps, verbose)
    else:
        distiller, teacher_path = choose()
        serving = teacher_store_run.Serving(make_dataset, total_steps, [], [])
    try:
        loop.fit_with_checkpoints(
            distiller, serving.make_dataset, checkpoint_dir=checkpoint_dir,
            every_steps=cadence.checkpoint_every_steps, keep=config.keep_checkpoints,
            every_minutes=config.checkpoint_every_minutes,
            log_every_steps=cadence.log_every_steps, boundaries=serving.boundaries,
            steps_per_epoch=steps_per_epoch, epochs=config.epochs, name="distillation",
            saved=student, replicas=replicas, callbacks=[logger, *serving.callbacks],
            verbose=fit_verbose)
    finally:
        serving.close()

    student_path = workdirs.save_model(student, os.path.join(workdir, workdirs.STUDENT_FILE))
    test_ds = data.eval_pipeline(build.source(config, "test"), size=config.student_size,
                                 batch_size=config.eval_batch_size, teacher_size=teacher_size)
    test = steplog.evaluate(distiller, test_ds)
    history = workdirs.read_metrics(metrics_path)
    report = {
        "config": json.loads(configs.to_json(config)),
        "test": {k: float(v) for k, v in test.items()},
        "student_top1": float(test.get("student_top1", math.nan)),
        "teacher_top1": float(test.get("teacher_top1", math.nan)),
        "agreement": float(test["agreement"]),
        "steps": total_steps,
        "epochs": config.epochs,
        "images": total_steps * config.batch_size,
        # Across resumes: earlier processes' logged time, plus all of this one's.
        "wall_time_s": round(logger.earlier_wall_time_s + time.time() - start, 1),
        "images_per_s": steplog.throughput(history, config.batch_size),
        "teacher_path": teacher_path,
        "student": student_path,
    }
    if not replicas.is_chief:
        return report
    workdirs.write_report(workdir, report, history)
    if verbose:
        print(f"Test: student top-1 {report['student_top1']:.2%}, teacher top-1 "
              f"{report['teacher_top1']:.2%}, agreement {report['agreement']:.2%}. "
              f"Wrote {student_path} and report.json.", flush=True)
    return report

