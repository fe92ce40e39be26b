"""Optimizers: the paper's AdamW and Shampoo, their schedules, Shampoo's matrix roots.

- `optimizers`: `adamw` and `shampoo` set up the paper's way (decoupled decay on
  kernels only, not scaled by the learning rate; warmup + cosine; clipping);
- `shampoo_optimizer`: the `Shampoo` optimizer (blocked Kronecker factors, grafted to Adam);
- `matrix_roots`: its inverse 4th roots (eigh or coupled Newton);
- `schedules`: `BitHyperRuleSchedule`, with which teachers are fine-tuned.
"""

from funmatch_keras.optim.optimizers import adamw, global_step, shampoo, warmup_cosine
from funmatch_keras.optim.schedules import BitHyperRuleSchedule
from funmatch_keras.optim.shampoo_optimizer import Shampoo

__all__ = ["BitHyperRuleSchedule", "Shampoo", "adamw", "global_step", "shampoo",
           "warmup_cosine"]
