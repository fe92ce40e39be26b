"""funmatch_keras: knowledge distillation as function matching, for Keras 3.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237).

Example:
>>> import funmatch_keras as fm
>>> sorted(fm.data.MODES)
['consistent', 'fixed_teacher', 'function_matching', 'independent']
"""

# Submodules and the two re-exported classes load on first attribute access
# (PEP 562), not at `import funmatch_keras`: `data`, `augment`, `sources` and
# `export` import TensorFlow, while `models`, `distiller`, `losses` and `optim`
# need only Keras. Lazy loading lets those run on the JAX backend on a machine
# without TensorFlow (benchmarks/gpu_check.py).

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

__all__ = ["Distiller", "DistillationKL", "augment", "compat", "configs", "data", "distribute",
           "export",
           "file_sources", "losses", "models", "optim", "recipe", "sources", "stream",
           "teacher_cache", "train", "tune", "verify", "views"]

# Public submodules, plus the ones the eager imports used to load as a side effect
# (`fm.distiller`, `fm.checkpoint`, `fm.loop` kept working; they still do).
_SUBMODULES = frozenset([
    "augment", "checkpoint", "checkpoint_callback", "checkpoint_format", "compat", "configs",
    "data", "distiller", "distribute", "export", "file_sources", "loop", "losses", "models",
    "optim", "recipe", "ship", "sources", "steplog", "stream", "teacher_cache", "train",
    "tune", "verify", "views",
])
# Re-exported name -> the submodule that defines it.
_ATTRIBUTES = {"Distiller": "distiller", "DistillationKL": "losses"}


def __getattr__(name: str) -> _typing.Any:
    if name in _SUBMODULES:
        # import_module also sets the attribute on this package, so this runs once.
        return _importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRIBUTES:
        module = _importlib.import_module(f"{__name__}.{_ATTRIBUTES[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


# Keras finds the classes that `.keras` files name (StdConv2D, Shampoo, …) only once
# their modules ran: they are imported now if Keras is loaded, else as soon as it is.
from funmatch_keras import keras_objects as _keras_objects  # noqa: E402

_keras_objects.register_when_keras_loads()

if _typing.TYPE_CHECKING:  # Static analyzers and IDEs see the eager imports.
    from funmatch_keras import (augment, compat, configs, data, distribute, export, file_sources,
                                losses, models, optim, recipe, sources, stream,
                                teacher_cache, train, tune, verify, views)
    from funmatch_keras.distiller import Distiller
    from funmatch_keras.losses import DistillationKL
