"""Tuning: how the frozen teacher is computed on this device, measured, not assumed.

- `teacher_paths`: the candidate compute paths (XLA for the step, for the teacher, or
  none; a bfloat16 teacher where the device computes it natively) and `apply`;
- `tune`: `teacher_path` times the candidates and keeps the fastest that agrees with
  the float32 teacher;
- `timing`: calls timed against each other, round-robin in alternating order (the
  tuner's and the benchmarks');
- `hardware`: the CPU's SIMD flags, and whether bfloat16 is native.
"""
