"""The package's Keras classes are registered whenever Keras is loaded.

A `.keras` file names our classes (`funmatch_keras>StdConv2D`, the BiT models'
convolution; `funmatch_keras>Shampoo`; …), and Keras finds them only if the module
that defines each was imported. `import funmatch_keras` must stay cheap (no Keras,
hence no TensorFlow, for `funmatch --help`), so it does not import them; instead:

- if Keras is already loaded, the defining modules are imported at once;
- otherwise they are imported right after Keras finishes loading (a post-import
  hook on the `keras` module), whoever imports it.

So `import keras, funmatch_keras; keras.saving.load_model(path)` works in any order.

Each module in `DEFINING_MODULES` imports nothing from this package by name
(`from funmatch_keras.x import name`), only modules: the hook may run while one
of them is half imported (it is the one that imported Keras), and skips those
already in `sys.modules`, which finish and register themselves.

Example:
>>> import keras
>>> import funmatch_keras
>>> for name in sorted(registered()):
...     print(name)
funmatch_keras>BitHyperRuleSchedule
funmatch_keras>DistillationKL
funmatch_keras>Shampoo
funmatch_keras>StdConv2D
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

PACKAGE = "funmatch_keras"

# Every module that registers a class with Keras. tests/journeys/test_load_in_a_fresh_process.py
# imports the whole package and fails if a registered class lives elsewhere.
DEFINING_MODULES = (
    "funmatch_keras.losses",
    "funmatch_keras.optim.schedules",
    "funmatch_keras.optim.shampoo_optimizer",
    "funmatch_keras.models.bit",
)


def registered() -> dict[str, Any]:
    """The objects this package registered with Keras, by registered name."""
    import keras

    return {name: obj for name, obj in keras.saving.get_custom_objects().items()
            if name.startswith(PACKAGE + ">")}


def import_defining_modules() -> None:
    """Imports each module of `DEFINING_MODULES` not already (being) imported."""
    for name in DEFINING_MODULES:
        if name not in sys.modules:
            importlib.import_module(name)


class _AfterKerasLoads(importlib.abc.MetaPathFinder):
    """Finds `keras` with the other finders and runs the registration after it loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # once; and the search below must not find us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            import_defining_modules()
        except Exception as error:  # never break `import keras` itself
            warnings.warn(f"{PACKAGE} could not register its Keras classes ({error!r}); "
                          "`.keras` files that use them will not load.", stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, … of the real loader
        return getattr(self._loader, name)


def register_when_keras_loads() -> None:
    """Registers the package's classes now if Keras is loaded, else right after it loads."""
    if "keras" in sys.modules:
        import_defining_modules()
    elif not any(isinstance(finder, _AfterKerasLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasLoads())
