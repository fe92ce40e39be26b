"""funmatch_keras: knowledge distillation as function matching, for Keras 3.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237).

The library's layers are subpackages: `data`, `models`, `optim`, `training`, `tuning`,
`export`; `Distiller` and its loss sit at the top; `configs` and `app` (the `funmatch`
command) turn a config and a workdir into calls of the library.

Example:
>>> import funmatch_keras as fm
>>> sorted(fm.data.MODES)
['consistent', 'fixed_teacher', 'function_matching', 'independent']
"""

# Submodules and the two re-exported classes load on first attribute access
# (PEP 562), not at `import funmatch_keras`: `data` and `export` import TensorFlow,
# while `models`, `distiller`, `losses` and `optim` need only Keras. Lazy loading lets
# those run on the JAX backend on a machine without TensorFlow
# (benchmarks/gpu_check.py), and keeps `funmatch --help` fast.

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# Attribute -> module. The subpackages and top-level modules, then short names for
# the modules users call most (`fm.augment`, `fm.loop`, `fm.tune`, …).
_MODULES = {
    **{name: f"funmatch_keras.{name}" for name in (
        "app", "atomic", "configs", "data", "distiller", "export", "keras_objects",
        "losses", "models", "optim", "recipe", "training", "tuning")},
    **{name: f"funmatch_keras.data.{name}" for name in (
        "augment", "file_sources", "sources", "stream", "teacher_cache", "views")},
    **{name: f"funmatch_keras.training.{name}" for name in (
        "checkpoint", "checkpoint_callback", "checkpoint_format", "compat", "distribute",
        "loop", "steplog")},
    "tune": "funmatch_keras.tuning.tune",
    "verify": "funmatch_keras.export.verify",
    "train": "funmatch_keras.app.distill",
}
# Re-exported name -> the module that defines it.
_ATTRIBUTES = {"Distiller": "funmatch_keras.distiller", "DistillationKL": "funmatch_keras.losses"}

__all__ = ["Distiller", "DistillationKL", "augment", "compat", "configs", "data", "distribute",
           "export", "file_sources", "losses", "models", "optim", "recipe", "sources",
           "stream", "teacher_cache", "train", "training", "tune", "tuning", "verify", "views"]


def __getattr__(name: str) -> _typing.Any:
    if name in _MODULES:
        value = _importlib.import_module(_MODULES[name])
    elif name in _ATTRIBUTES:
        value = getattr(_importlib.import_module(_ATTRIBUTES[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_MODULES))


# Keras finds the classes that `.keras` files name (StdConv2D, Shampoo, …) only once
# their modules ran: they are imported now if Keras is loaded, else as soon as it is.
from funmatch_keras import keras_objects as _keras_objects  # noqa: E402

_keras_objects.register_when_keras_loads()

if _typing.TYPE_CHECKING:  # Static analyzers and IDEs see the eager imports.
    from funmatch_keras import (
        configs,
        data,
        export,
        losses,
        models,
        optim,
        recipe,
        training,
        tuning,
    )
    from funmatch_keras.app import distill as train
    from funmatch_keras.data import augment, file_sources, sources, stream, teacher_cache, views
    from funmatch_keras.distiller import Distiller
    from funmatch_keras.export import verify
    from funmatch_keras.losses import DistillationKL
    from funmatch_keras.training import compat, distribute
    from funmatch_keras.tuning import tune
