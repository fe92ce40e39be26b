"""funmatch_keras: knowledge distillation as function matching, for Keras 3.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237).

Example:
>>> import funmatch_keras as fm
>>> sorted(fm.data.MODES)
['consistent', 'fixed_teacher', 'function_matching', 'independent']
"""

from funmatch_keras import (augment, configs, data, distribute, export, losses, models, optim,
                            sources, train)
from funmatch_keras.distiller import Distiller
from funmatch_keras.losses import DistillationKL

__version__ = "0.1.0"

__all__ = ["Distiller", "DistillationKL", "augment", "configs", "data", "distribute", "export",
           "losses",
           "models", "optim", "sources", "train"]
