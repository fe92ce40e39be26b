"""Training: the resumable loop, checkpoints, step logging and replication.

- `loop`: `fit_resumably` (Keras `fit` over virtual epochs of one log interval, from
  any step), `fit_with_checkpoints` (that, resumed from and saved to checkpoints);
- `checkpoint_callback`, `checkpoint`, `checkpoint_format`: when to save, keep-last-k
  and restore, and one checkpoint directory on disk (never the teacher);
- `steplog`: progress, `metrics.jsonl`, TensorBoard and evaluation on the step cadence;
- `distribute`, `compat`: the strategy for this machine, and Keras's multi-worker patch.
"""
