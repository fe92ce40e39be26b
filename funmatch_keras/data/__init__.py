"""Data: where examples come from, the paper's augmentations, and the tf.data pipelines.

- `sources`, `file_sources`: examples with stable indices, sharded across workers
  (tfds, arrays, the bundled digits; TFRecords, image folders), with `array_checks`;
- `views`, `stream`: per-example crops, flips and decoding; the seeded example order;
- `augment`: Inception crop, flip, value range, eval resize, the paper's mixup (TF ops);
- `pipelines`: `train_pipeline` (the four teaching modes), `eval_pipeline`;
- `teacher_cache`: the fixed-teacher baseline's logits, computed once.

Nothing here runs a model but `teacher_cache`, and nothing reads a config.

Example:
>>> import funmatch_keras as fm
>>> sorted(fm.data.MODES)
['consistent', 'fixed_teacher', 'function_matching', 'independent']
"""

from funmatch_keras.data.pipelines import (
                                           DEFAULT_SHUFFLE_BUFFER,
                                           MODES,
                                           eval_pipeline,
                                           steps_per_epoch,
                                           train_pipeline,
)

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "MODES", "eval_pipeline", "steps_per_epoch",
           "train_pipeline"]
