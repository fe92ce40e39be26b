"""How training is replicated: a `tf.distribute` strategy or a JAX `DataParallel`.

`strategy(kind="auto")` picks the TensorFlow strategy for the machine it runs
on: a TPU (`TPUStrategy`), else a cluster described by `TF_CONFIG`
(`MultiWorkerMirroredStrategy`), else several GPUs (`MirroredStrategy`), else
the default (one-device) strategy. Under the JAX backend, `data_parallel()`
splits each batch over the local devices with `keras.distribution.DataParallel`
(docs/design.md §5: `keras.distribution` does not support TensorFlow).

`replication(kind)` wraps either in one object that `train.run` uses: the
number of replicas (the global batch must be a multiple of it), whether this
process is the chief (the only one that writes checkpoints and reports), and a
`scope()` to build models, optimizer and `Distiller` in and to train under.

The kind comes from the argument, else the `FUNMATCH_STRATEGY` environment
variable, else `"auto"`. A `MultiWorkerMirroredStrategy`, chosen here or passed
in, gets `compat.patch_keras_for_multi_worker()` (Keras 3 cannot `fit` across
workers without it).

Example:
>>> import funmatch_keras.training.distribute as distribute
>>> replicas = distribute.replication("default")
>>> replicas.num_replicas, replicas.is_chief
(1, True)
>>> with replicas.scope():
...     pass  # build the models, compile and fit the Distiller here
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import keras
from absl import logging

from funmatch_keras.training import compat

ENV_VAR = "FUNMATCH_STRATEGY"
TF_KINDS = ("auto", "tpu", "mirrored", "multi_worker", "default")
JAX_KINDS = ("auto", "data_parallel", "default")


# ------------------------------------------------------------- TensorFlow


def _tpu_resolver(tpu: str | None = None):
    """A `TPUClusterResolver`, or None when no TPU can be found.

    Without a name, `TPUClusterResolver()` finds Colab / Cloud TPU nodes from
    their environment variables (`TPU_NAME`, ...) and raises `ValueError`
    otherwise, without touching the network. TPU VMs attach the chips to this
    host instead: they are listed as physical TPU devices and need `tpu="local"`.
    """
    import tensorflow as tf

    try:
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    except (ValueError, ImportError, RuntimeError) as error:
        if tpu is not None:
            raise ValueError(f"Cannot resolve the TPU {tpu!r}: {error}") from None
    if tf.config.list_physical_devices("TPU"):
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    return None


def _tf_config_cluster() -> dict[str, Any] | None:
    """The `cluster` of a `TF_CONFIG` that describes workers, or None."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        cluster = json.loads(text).get("cluster") or {}
    except (ValueError, AttributeError):
        raise ValueError(f"TF_CONFIG is not a JSON object. Received: TF_CONFIG={text!r}") from None
    return cluster if (cluster.get("worker") or cluster.get("chief")) else None


def _tpu_strategy(resolver):
    import tensorflow as tf

    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def strategy(kind: str = "auto", tpu: str | None = None):
    """The `tf.distribute.Strategy` to train with.

    With `"auto"` the first that applies wins: a TPU (`TPUStrategy`, after
    connecting to it and initializing it); a cluster in `TF_CONFIG`
    (`MultiWorkerMirroredStrategy`, which also uses every GPU of each worker,
    so it is checked before local GPUs); several GPUs (`MirroredStrategy`);
    else the default strategy (one device). The choice and the number of
    replicas are logged.

    `MultiWorkerMirroredStrategy` must be created before TensorFlow runs any
    op, so call this first thing in a program. Keras is patched for it
    (`compat.patch_keras_for_multi_worker`).

    Args:
        kind: str. One of `"auto"`, `"tpu"`, `"mirrored"`, `"multi_worker"`,
            `"default"`. Defaults to `"auto"`.
        tpu: str or None. TPU name or `grpc://` address (`"local"` for a TPU
            VM) for `kind="tpu"`/`"auto"`. Defaults to autodetection.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: an unknown kind, or `"tpu"` where no TPU is found.

    Example:
    >>> strategy("default").num_replicas_in_sync
    1
    """
    import tensorflow as tf

    if kind not in TF_KINDS:
        raise ValueError(f"Unknown strategy kind. Expected one of {TF_KINDS}. "
                         f"Received: kind={kind!r}")
    chosen = None
    if kind in ("auto", "tpu"):
        resolver = _tpu_resolver(tpu)
        if resolver is not None:
            chosen = _tpu_strategy(resolver)
        elif kind == "tpu":
            raise ValueError("kind='tpu' but no TPU was found: set TPU_NAME, pass "
                             "tpu='<name>' (or 'local' on a TPU VM), or use kind='auto'.")
    if chosen is None and (kind == "multi_worker"
                           or (kind == "auto" and _tf_config_cluster() is not None)):
        chosen = tf.distribute.MultiWorkerMirroredStrategy()
    if chosen is None and kind in ("auto", "mirrored"):
        gpus = tf.config.list_physical_devices("GPU")
        if kind == "mirrored" or len(gpus) > 1:
            chosen = tf.distribute.MirroredStrategy()
    if chosen is None:
        chosen = tf.distribute.get_strategy()
    compat.patch_for_strategy(chosen)  # Keras 3 cannot fit across workers otherwise
    logging.info("Distribution: %s (kind=%r) with %d replica(s).",
                 _strategy_name(chosen), kind, chosen.num_replicas_in_sync)
    return chosen


def is_chief(strategy=None) -> bool:
    """Whether this process is the one that writes checkpoints and reports.

    Under `tf.distribute`, the chief is task `chief`, else worker 0 of a
    cluster without one; a single process is always the chief. Under JAX it is
    process 0.

    Args:
        strategy: `tf.distribute.Strategy` or None (the JAX process index, or
            the current TensorFlow strategy).

    Returns:
        bool.

    Example:
    >>> is_chief()
    True
    """
    if strategy is None and keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    if strategy is None:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    return _is_chief_task(resolver.task_type, resolver.task_id,
                          resolver.cluster_spec().as_dict())


def _num_workers(strategy) -> int:
    """Worker processes of a `MultiWorkerMirroredStrategy` cluster (else 1)."""
    import tensorflow as tf

    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def _is_chief_task(task_type: str, task_id: int, cluster: dict) -> bool:
    if task_type == "chief":
        return True
    return task_type == "worker" and int(task_id or 0) == 0 and "chief" not in cluster


def _strategy_name(strategy) -> str:
    """The public class name (MultiWorkerMirroredStrategy is a CollectiveAllReduceStrategy)."""
    import tensorflow as tf

    for public, name in ((tf.distribute.MultiWorkerMirroredStrategy,
                          "MultiWorkerMirroredStrategy"),
                         (tf.distribute.MirroredStrategy, "MirroredStrategy"),
                         (tf.distribute.TPUStrategy, "TPUStrategy")):
        if isinstance(strategy, public):
            return name
    return type(strategy).__name__


def _task_name(strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief"
    return f"{resolver.task_type}_{resolver.task_id}"


# -------------------------------------------------------------------- JAX


def data_parallel(devices: list[str] | None = None):
    """A `keras.distribution.DataParallel` over `devices`, or None for one device.

    Each batch is split along its first axis over the devices; the variables
    are replicated. tf.data still produces the (global) batches.

    Args:
        devices: list of device names. Defaults to
            `keras.distribution.list_devices()`.

    Returns:
        `keras.distribution.DataParallel`, or None when there is a single device.

    Example:
    >>> data_parallel(["cpu:0"]) is None
    True
    """
    devices = list(devices or keras.distribution.list_devices())
    if len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices)


# ---------------------------------------------------------------- both


@dataclasses.dataclass
class Replication:
    """How a training run is replicated (see `replication`).

    Attributes:
        kind: str. What was chosen, e.g. `"MirroredStrategy"` or `"DataParallel"`.
        num_replicas: int. Replicas one global batch is split over.
        is_chief: bool. Whether this process writes checkpoints and reports.
        task: str. `"chief"`, or e.g. `"worker_1"` for other workers.
        strategy: `tf.distribute.Strategy` (TensorFlow) or None.
        distribution: `keras.distribution.Distribution` (JAX) or None.
        num_workers: int. Processes that each run an input pipeline
            (`MultiWorkerMirroredStrategy` workers), else 1.
    """

    kind: str
    num_replicas: int
    is_chief: bool
    task: str = "chief"
    strategy: Any = None
    distribution: Any = None
    num_workers: int = 1

    def train_dataset(self, make_pipeline: Callable[[Any], Any]) -> Any:
        """The training input: one global pipeline, or one per worker.

        Args:
            make_pipeline: `fn(input_context) -> tf.data.Dataset`, e.g. a
                `data.train_pipeline` with `input_context=input_context`.

        Returns:
            `make_pipeline(None)` (global batches) on one worker. Across
            workers, `strategy.distribute_datasets_from_function(make_pipeline)`:
            each worker reads its own shard of the data (by file for TFRecords)
            instead of every worker reading everything.

        Example:
        >>> import tensorflow as tf
        >>> ds = replication("default").train_dataset(lambda ctx: tf.data.Dataset.range(3))
        >>> int(ds.cardinality())
        3
        """
        if self.num_workers > 1:
            return self.strategy.distribute_datasets_from_function(make_pipeline)
        return make_pipeline(None)

    def barrier(self) -> None:
        """Returns once every worker has called it (at once with one worker).

        One all-reduce over the workers: e.g. no worker reads the shared
        checkpoints before the chief's `--overwrite` has moved the old run aside.

        Example:
        >>> replication("default").barrier()
        """
        if self.num_workers > 1:
            import tensorflow as tf

            strategy = self.strategy
            strategy.reduce(tf.distribute.ReduceOp.SUM,
                            strategy.run(lambda: tf.constant(1.0)), axis=None)

    def chief_value(self, value: int) -> int:
        """The chief's `value` (an int or bool), on every worker.

        What the chief's disk holds (a checkpoint, a trained teacher) decides for
        every worker: the others may have disks of their own.

        Example:
        >>> replication("default").chief_value(True)
        1
        """
        import numpy as np

        (result,) = self._from_chief([np.asarray(int(value), "int64")])
        return int(result)

    def broadcast_from_chief(self, variables: Sequence[Any]) -> None:
        """Assigns the chief's values of `variables` on every worker (a no-op on one).

        Every worker passes the same variables, in the same order (the weights
        of the same model, an optimizer built on them).

        Example:
        >>> v = keras.Variable([1.0, 2.0])
        >>> replication("default").broadcast_from_chief([v])
        >>> v.numpy().tolist()
        [1.0, 2.0]
        """
        if self.num_workers == 1:
            return
        arrays = [keras.ops.convert_to_numpy(v) for v in variables]
        for variable, value in zip(variables, self._from_chief(arrays)):
            variable.assign(value)

    def _from_chief(self, arrays: list) -> list:
        """The chief's NumPy `arrays` on every worker: one all-reduce (a sum) per
        wire dtype, to which only the chief's first replica contributes: exact."""
        if self.num_workers == 1:
            return arrays
        import numpy as np
        import tensorflow as tf

        groups: dict[str, list[int]] = {}  # dtypes that hold each value exactly
        for index, array in enumerate(arrays):
            if array.dtype.kind in "iub":
                wire = "int64"
            else:  # float32, and float16/bfloat16 widened
                wire = "float64" if array.dtype == np.float64 else "float32"
            groups.setdefault(wire, []).append(index)
        results = list(arrays)
        for wire, indices in sorted(groups.items()):
            flat = np.concatenate([arrays[i].astype(wire).ravel() for i in indices])
            calls = []

            def contribution(context, flat=flat, calls=calls):
                calls.append(context)
                keep = self.is_chief and len(calls) == 1
                return tf.constant(flat if keep else np.zeros_like(flat))

            summed = self.strategy.reduce(
                tf.distribute.ReduceOp.SUM,
                self.strategy.experimental_distribute_values_from_function(contribution),
                axis=None)
            summed, start = np.asarray(summed), 0
            for i in indices:
                size = arrays[i].size
                results[i] = summed[start:start + size].reshape(arrays[i].shape).astype(
                    arrays[i].dtype)
                start += size
        return results

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Build models, optimizer and `Distiller`, and train, inside this."""
        if self.strategy is not None:
            with self.strategy.scope():
                yield
        elif self.distribution is not None:
            with self.distribution.scope():  # restores the previous distribution
                yield
        else:
            yield


def replication(kind: str | Any | None = None) -> Replication:
    """The replication for the current Keras backend.

    Args:
        kind: str, a `tf.distribute.Strategy`, or None. TensorFlow: a kind of
            `strategy()` or a strategy object. JAX: `"auto"` (`DataParallel`
            over the local devices when there are several), `"data_parallel"`
            or `"default"` (no distribution). Defaults to the
            `FUNMATCH_STRATEGY` environment variable, else `"auto"`.

    Returns:
        A `Replication`.

    Raises:
        ValueError: a kind the backend does not offer.

    Example:
    >>> replication("default").num_replicas
    1
    """
    if kind is None:
        kind = os.environ.get(ENV_VAR, "").strip() or "auto"
    if keras.backend.backend() == "jax":
        if kind not in JAX_KINDS:
            raise ValueError(
                f"The JAX backend replicates with keras.distribution: the strategy must be "
                f"one of {JAX_KINDS}. Received: {kind!r} (TensorFlow strategies need "
                "KERAS_BACKEND=tensorflow)."
            )
        distribution = None if kind == "default" else data_parallel()
        if kind == "data_parallel" and distribution is None:
            logging.warning("kind='data_parallel' but only one device: not distributing.")
        num = 1 if distribution is None else len(distribution.device_mesh.devices.flatten())
        name = type(distribution).__name__ if distribution is not None else "default"
        logging.info("Distribution: %s (kind=%r) with %d replica(s).", name, kind, num)
        return Replication(name, num, is_chief(), strategy=None, distribution=distribution)
    if keras.backend.backend() != "tensorflow":
        if kind not in ("auto", "default"):
            raise ValueError(f"Distributed training supports the tensorflow and jax "
                             f"backends, not {keras.backend.backend()!r}.")
        return Replication("default", 1, True)
    chosen = strategy(kind) if isinstance(kind, str) else kind
    compat.patch_for_strategy(chosen)  # also for a strategy built by the caller
    return Replication(_strategy_name(chosen), chosen.num_replicas_in_sync,
                       is_chief(chosen), _task_name(chosen), strategy=chosen,
                       num_workers=_num_workers(chosen))


def check_batch_size(batch_size: int, num_replicas: int, name: str = "batch_size") -> None:
    """Raises a `ValueError` unless the global batch splits evenly over the replicas.

    Example:
    >>> check_batch_size(16, 2)
    >>> check_batch_size(15, 2)
    Traceback (most recent call last):
    ...
    ValueError: The global batch_size=15 must be a multiple of the 2 replicas (each
    replica gets batch_size / 2 examples). Use batch_size=14 or 16.
    """
    if batch_size % num_replicas:
        lower = batch_size - batch_size % num_replicas
        raise ValueError(
            f"The global {name}={batch_size} must be a multiple of the {num_replicas} "
            f"replicas (each replica gets {name} / {num_replicas} examples). Use "
            f"{name}={lower or num_replicas} or {lower + num_replicas}."
        )


def worker_dir(workdir: str, task: str) -> str:
    """Where a non-chief worker writes its own files (never checkpoints or reports).

    Example:
    >>> worker_dir("/tmp/run", "worker_1")
    '/tmp/run/workertemp_worker_1'
    """
    return os.path.join(workdir, f"workertemp_{task}")
