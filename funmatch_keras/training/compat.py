"""Workarounds for Keras bugs that funmatch_keras users would otherwise hit.

One workaround: Keras 3 (3.0 up to at least 3.15.1, the newest release checked)
cannot `fit` or `evaluate` across the workers of a
`tf.distribute.MultiWorkerMirroredStrategy`; see
https://github.com/tensorflow/tensorflow/issues/72388 ("Invalid reduction
dimension 0 for input with 0 dimensions"). `patch_keras_for_multi_worker()`
fixes it in this process. funmatch applies it by itself for every
multi-worker strategy it meets: `distribute.strategy()`,
`distribute.replication(strategy)`, and `Distiller.compile` under such a
strategy. Call it yourself only to `fit` other Keras models across workers.

Example:
>>> import funmatch_keras.training.compat as compat
>>> compat.in_patched_range("3.15.1"), compat.in_patched_range("3.16.0")
(True, False)
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import keras
from absl import logging

# Keras versions whose TensorFlow trainer reduces the per-step metric values of
# a multi-worker strategy with `strategy.reduce("MEAN", value, axis=0)`, which
# fails on the scalar values every step returns (tensorflow#72388, closed
# without a fix). Every release from 3.0 to 3.15.1, the newest when this was
# written, has that line. The upper bound is the first release nobody has
# checked: on a newer Keras the patch is not applied until its trainer has
# been read (and the bound raised here, after tests/training/test_compat.py passes).
_NEEDS_PATCH = ((3, 0), (3, 16))  # [lower, upper): (major, minor)

# The faulty line, as Keras 3.0–3.15 spell it in `reduce_per_replica`.
_FAULTY_REDUCTION = re.compile(r"""\.reduce\(\s*["']MEAN["']\s*,\s*\w+\s*,\s*axis\s*=\s*0\s*\)""")

# The private Keras functions the patch replaces, with the parameters the
# replacements accept and pass on (checked before patching, and by the tests).
PATCHED_SIGNATURES = {
    "reduce_per_replica": ("values", "strategy", "reduction"),
    "TensorFlowTrainer._maybe_symbolic_build": ("self", "iterator", "data_batch"),
}

_MARK = "_funmatch_patched"


def _version(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def in_patched_range(version: str | None = None) -> bool:
    """Whether a Keras version is one known to need the multi-worker patch.

    Args:
        version: str or None. A Keras version, e.g. `"3.15.1"`. Defaults to
            the installed one.

    Returns:
        bool. True for versions in `[3.0, 3.16)`.
    """
    lower, upper = _NEEDS_PATCH
    return lower <= _version(version or keras.version()) < upper


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _targets() -> dict[str, Any]:
    """The functions to replace, by the names of `PATCHED_SIGNATURES`."""
    trainer = _trainer_module()
    return {"reduce_per_replica": trainer.reduce_per_replica,
            "TensorFlowTrainer._maybe_symbolic_build":
                trainer.TensorFlowTrainer._maybe_symbolic_build}


def signatures_match() -> bool:
    """Whether Keras's private functions still have the parameters the patch relies on."""
    return all(tuple(inspect.signature(function).parameters) == PATCHED_SIGNATURES[name]
               for name, function in _targets().items())


def has_faulty_reduction() -> bool:
    """Whether the installed Keras reduces multi-worker scalars with `axis=0`.

    Reads the source of `reduce_per_replica`; True when it cannot be read (an
    install without sources), so that the version range alone decides.
    """
    function = getattr(_trainer_module().reduce_per_replica, "__wrapped__",
                       _trainer_module().reduce_per_replica)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return True
    return bool(_FAULTY_REDUCTION.search(source))


def is_patched() -> bool:
    """Whether `patch_keras_for_multi_worker` has been applied in this process."""
    return getattr(_trainer_module().reduce_per_replica, _MARK, False)


def needs_patch() -> bool:
    """Whether this process should patch Keras: TensorFlow backend, a faulty Keras."""
    return (keras.backend.backend() == "tensorflow" and in_patched_range()
            and has_faulty_reduction())


def patch_keras_for_multi_worker() -> bool:
    """Lets `fit`/`evaluate` run across the workers of a `MultiWorkerMirroredStrategy`.

    Keras 3.0–3.15 reduces each step's per-replica metric values under a
    multi-worker strategy with `strategy.reduce("MEAN", value, axis=0)`, which
    fails on scalars ("Invalid reduction dimension 0 for input with 0
    dimensions", tensorflow#72388), so any `fit` stops at its first step.
    Scalars are averaged over the replicas instead (`axis=None`), as Keras does
    on one worker. Likewise `evaluate` first "reduces" a whole input batch
    across workers just to learn its shapes, which fails too: this worker's
    first replica's batch is used instead. Anything else goes to Keras
    unchanged, and nothing changes unless the strategy spans several workers.

    Idempotent, and a no-op where it is not needed (another backend, a Keras
    outside the versions known to need it).

    Returns:
        bool. Whether the patch is in place.
    """
    if not needs_patch():
        if keras.backend.backend() == "tensorflow" and not in_patched_range():
            if has_faulty_reduction():
                warnings.warn(
                    f"Keras {keras.version()} still reduces multi-worker metrics with "
                    "axis=0 (tensorflow#72388), but funmatch_keras.training.compat has not been "
                    "checked against it: fit under MultiWorkerMirroredStrategy may fail.",
                    stacklevel=2)
        return False
    if is_patched():
        return True
    if not signatures_match():
        warnings.warn(
            f"Keras {keras.version()}'s TensorFlow trainer changed: not patching it for "
            "MultiWorkerMirroredStrategy (tensorflow#72388).", stacklevel=2)
        return False
    _apply(_trainer_module())
    logging.info("Patched Keras %s for fit/evaluate under MultiWorkerMirroredStrategy "
                 "(tensorflow#72388).", keras.version())
    return True


def _multi_worker(strategy) -> bool:
    import tensorflow as tf

    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def _apply(trainer) -> None:
    import tensorflow as tf

    original_reduce = trainer.reduce_per_replica
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if not _multi_worker(strategy) or reduction not in ("auto", "mean"):
            return original_reduce(values, strategy, reduction)

        def reduce(value):
            # One replica per worker gives plain tensors, several give PerReplica.
            if strategy.experimental_local_results(value)[0].shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original_reduce(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and _multi_worker(strategy):
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(it))
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    reduce_per_replica.__wrapped__ = original_reduce
    _maybe_symbolic_build.__wrapped__ = original_build
    setattr(reduce_per_replica, _MARK, True)
    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def patch_for_strategy(strategy: Any) -> bool:
    """Applies `patch_keras_for_multi_worker` when `strategy` is a `MultiWorkerMirroredStrategy`.

    Called by `distribute` and `Distiller.compile`; cheap for any other
    strategy, and imports nothing on another backend.

    Returns:
        bool. Whether the patch is in place.
    """
    if strategy is None or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return is_patched()
    return patch_keras_for_multi_worker()
