"""Learning-rate schedules that Keras lacks, serializable with a model's optimizer.

`BitHyperRuleSchedule` is the BiT-HyperRule's (Kolesnikov et al., "Big Transfer
(BiT)", ECCV 2020), with which `funmatch train-teacher` fine-tunes teachers. The
paper's distillation schedule, warmup then cosine, is Keras's own `CosineDecay`
(`optim.warmup_cosine`).
"""

from __future__ import annotations

import keras

# Fractions of the run at which the BiT-HyperRule divides the learning rate by 10.
BIT_DECAY_POINTS = (0.3, 0.6, 0.9)


@keras.saving.register_keras_serializable(package="funmatch_keras")
class BitHyperRuleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `lr`, then ÷10 at 30%, 60% and 90% of `total_steps`.

    Example:
    >>> schedule = BitHyperRuleSchedule(0.003, total_steps=1000, warmup_steps=100)
    >>> [round(float(schedule(s)), 6) for s in (50, 200, 400, 700, 950)]
    [0.0015, 0.003, 0.0003, 3e-05, 3e-06]
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int):
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.minimum(1.0, (step + 0.0) / max(self.warmup_steps, 1))
        decays = sum(keras.ops.cast(step >= point * self.total_steps, "float32")
                     for point in BIT_DECAY_POINTS)
        return self.lr * warmup * keras.ops.power(0.1, decays)

    def get_config(self):
        return {"lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}
