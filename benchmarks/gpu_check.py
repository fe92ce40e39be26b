"""GPU check on the JAX backend: timm parity of the BiT port, and Distiller step speed.

Three parts, one process (plus one subprocess for PyTorch), no TensorFlow needed:

(a) **timm parity.** An independent second implementation of BiT ResNetV2:
    timm's `resnetv2_50x1_bit` (and `resnetv2_101x1_bit`) built with random
    weights, its GroupNorm scales/offsets and head redrawn at random (timm's
    defaults, 1 / 0 / ~0, would hide a swapped scale and offset) and any
    zero-initialized conv redrawn too, its `state_dict` saved
    as `.safetensors`, loaded into our `models.bit_r50x1` with
    `models.load_timm_bit`, both run on the same batch in [-1, 1] (timm's BiT
    config: mean 0.5, std 0.5; ours per docs/design.md §4.1). Reported: max |Δ logit|,
    that over max |logit| (relative error), and top-1 agreement. PyTorch runs in
    float32 with TF32 off, in a subprocess (its CUDA libraries and memory stay
    out of JAX's way); JAX with `jax_default_matmul_precision="highest"`.

(b) **Distillation step throughput.** `Distiller(teacher=BiT-R101x1 (frozen,
    random weights, random head, unfolded), student=BiT-R50x1)`, compiled as `train.py`
    does (`optim.adamw`, `jit_compile=True`), fed one device-resident random
    batch repeated (function matching: a plain image batch), timed with `fit`:
    one warm-up epoch (includes compilation), then `--windows` epochs of
    `--steps` steps; each window's end blocks on the loss (JAX is async). Per
    batch size, float32 vs `mixed_bfloat16` (models rebuilt per policy):
    median ms/step, images/s, the bf16/fp32 speed ratio. The fp32 run keeps
    JAX's default matmul precision unless `--fp32-precision` says otherwise.

(c) **The paper's pair, live vs replayed.** BiT-R152x2 teacher at
    `--pair-teacher-size` (224) -> BiT-R50x1 student at `--pair-student-size`
    (160), random weights, the teacher's head redrawn and its weight
    standardization folded into the kernels (as `funmatch distill` builds a
    frozen BiT teacher), compiled as in (b). Per batch size (`--pair-batches`)
    and policy, two steps timed as in (b): *live*, on a cross-resolution batch
    `{"student": x160, "teacher": x224}` (x160 = x224 resized), both models
    run; *replayed*, on `{"student": x160, "teacher_logits": l}` with `l` the
    teacher's logits for x224 computed once and kept on the device: the step
    of a run replaying a teacher store (`--config.teacher_store`). Reading the
    store (tf.data, host-side I/O, absent here) is not timed. Reported: median
    ms/step and images/s of both, `replay_over_live` (replayed ms over live
    ms) and `teacher_share` (1 - that: the part of a live step the teacher
    costs), finite losses.

The order: (a) on the first model, (c), (b), then (a) on the others. Stages
past the first of each part are skipped when they would overrun `--budget-s`
(420 s by default, so that a run fits a 10-minute job limit; estimated from the
stage times seen so far). The JSON is rewritten after every stage, so a run
cut short still leaves its results. On one H200 the default run takes about 7
minutes (an estimate: (a) and (b) alone took 3.5); `--skip-parity
--skip-throughput` gives (c) the whole budget.

Usage:
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --quick --out /tmp/g.json  # CPU smoke
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --out $OUT/gpu_check.json  # H100/H200

On a machine without Keras (jax, torch, timm, safetensors present), put the
wheels of keras, namex, optree, packaging and typing_extensions in .whl/
(`pip download --no-deps --only-binary=:all: ...` for its Python and platform) and:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

NUM_CLASSES = 10
# Our constructor name -> timm model name.
ARCHS = {"bit_r50x1": "resnetv2_50x1_bit", "bit_r101x1": "resnetv2_101x1_bit"}
POLICIES = ("float32", "mixed_bfloat16")
# The paper's pair (Beyer et al. 2022): teacher at 224 px, student at 160 px.
PAIR = ("bit_r152x2", "bit_r50x1")


# ---------------------------------------------------------------- PyTorch side


def _perturb_timm(model: Any, seed: int) -> None:
    """Makes every parameter of a timm ResNetV2 non-trivial, deterministically.

    timm initializes GroupNorm to (1, 0), the head to ~0 and, where
    `zero_init_last` is on, each unit's last conv to 0: a parity check on those
    would not see a swapped scale/offset or a skipped residual branch.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("head."):
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=gen) / fan_in**0.5
            elif param.ndim == 4:
                if not bool(param.abs().max() > 0):  # a zero-initialized last conv
                    fan_in = param[0].numel()
                    value = torch.randn(param.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                else:
                    value = param.detach().clone()
            elif name.endswith("weight"):  # GroupNorm scale
                value = 0.5 + torch.rand(param.shape, generator=gen)
            else:  # GroupNorm offset, biases
                value = 0.25 * torch.randn(param.shape, generator=gen)
            param.copy_(value)


def torch_reference(workdir: str, archs: list[str], seed: int) -> None:
    """Subprocess entry: timm logits for `workdir/inputs.npy` (NHWC), weights saved.

    Writes `{arch}.safetensors`, `{arch}_logits.npy` and `torch_meta.json`.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = np.load(os.path.join(workdir, "inputs.npy"))
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    meta: dict[str, Any] = {
        "torch": torch.__version__, "timm": timm.__version__, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "allow_tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "models": {},
    }
    for arch in archs:
        torch.manual_seed(seed)
        model = timm.create_model(ARCHS[arch], pretrained=False, num_classes=NUM_CLASSES)
        _perturb_timm(model, seed)
        model.eval()
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(workdir, f"{arch}.safetensors"))
        model.to(device)
        with torch.no_grad():
            logits = model(batch).float().cpu().numpy()
        np.save(os.path.join(workdir, f"{arch}_logits.npy"), logits)
        stem_eps = getattr(model.stem.conv, "eps", None)
        meta["models"][arch] = {"timm_name": ARCHS[arch], "tensors": len(state),
                                "params": int(sum(v.numel() for v in state.values())),
                                "std_conv_eps": stem_eps}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(workdir, "torch_meta.json"), "w") as f:
        json.dump(meta, f)


# ---------------------------------------------------------------- JAX side


class Report:
    """Results so far, written to `path` after every stage."""

    def __init__(self, path: str | None, start: float, budget_s: float):
        self.path = path
        self.start = start
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"parity": [], "throughput": [], "pair": [],
                                     "skipped": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate_s: float, what: str) -> bool:
        if self.elapsed() + estimate_s <= self.budget_s:
            return True
        self.skip(what, f"budget: {self.elapsed():.0f}s used + ~{estimate_s:.0f}s "
                        f"estimated > --budget-s {self.budget_s:.0f}")
        return False

    def skip(self, what: str, why: str) -> None:
        print(f"  SKIPPED {what}: {why}", flush=True)
        self.data["skipped"].append({"what": what, "why": why})
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _environment() -> dict[str, Any]:
    import jax
    import keras

    device = jax.devices()[0]
    return {
        "python": platform.python_version(), "jax": jax.__version__,
        "keras": keras.__version__, "backend": keras.backend.backend(),
        "platform": device.platform, "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "default_matmul_precision": _matmul_precision(),
    }


def _peak_bytes() -> int | None:
    """The device's peak bytes in use so far (this process), where JAX reports it."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # not every platform reports memory
        return None
    return stats.get("peak_bytes_in_use")


def _matmul_precision() -> str | None:
    import jax

    return getattr(jax.config, "jax_default_matmul_precision", None)


def prepare_parity(args: argparse.Namespace, report: Report, workdir: str) -> dict | None:
    """Writes the input batch and runs timm in a subprocess; returns its metadata."""
    missing = [m for m in ("torch", "timm", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        report.skip("parity", f"not installed here: {', '.join(missing)}")
        report.data["parity_unavailable"] = True
        return None
    rng = np.random.default_rng(args.seed)
    shape = (args.parity_batch, args.parity_size, args.parity_size, 3)
    np.save(os.path.join(workdir, "inputs.npy"), rng.uniform(-1.0, 1.0, shape).astype("float32"))
    t0 = time.perf_counter()
    # A child process: torch's CUDA context and libraries stay apart from JAX's.
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--torch-reference", workdir,
         "--parity-archs", *args.parity_archs, "--seed", str(args.seed)],
        capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-4000:], sep="\n")
        report.skip("parity", f"torch reference failed (rc {result.returncode}): "
                              f"{result.stderr.strip().splitlines()[-1:]}")
        return None
    with open(os.path.join(workdir, "torch_meta.json")) as f:
        meta = json.load(f)
    report.data["torch"] = {k: v for k, v in meta.items() if k != "models"}
    report.write()
    print(f"  timm reference: torch {meta['torch']}, timm {meta['timm']} on "
          f"{meta['device_name']} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return meta


def check_parity(args: argparse.Namespace, report: Report, workdir: str, meta: dict,
                 arch: str) -> float:
    """Our `arch` with timm's weights vs timm's logits; returns the seconds it took."""
    import jax

    from funmatch_keras import models

    t0 = time.perf_counter()
    images = np.load(os.path.join(workdir, "inputs.npy"))
    previous = _matmul_precision()
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        model = getattr(models, arch)(NUM_CLASSES, image_size=args.parity_size,
                                      dtype="float32")
        models.load_timm_bit(model, os.path.join(workdir, f"{arch}.safetensors"), head=True)
        ours = np.asarray(model.predict_on_batch(images), dtype=np.float64)
    finally:
        jax.config.update("jax_default_matmul_precision", previous)
    theirs = np.load(os.path.join(workdir, f"{arch}_logits.npy")).astype(np.float64)
    seconds = time.perf_counter() - t0
    diff = np.abs(ours - theirs)
    row = {
        "arch": arch, **meta["models"][arch],
        "image_size": args.parity_size, "batch": args.parity_batch,
        "max_abs_logit": float(np.abs(theirs).max()),
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "relative_error": float(diff.max() / max(np.abs(theirs).max(), 1e-12)),
        "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        "keras_params": int(model.count_params()), "seconds": round(seconds, 1),
    }
    row["ok"] = bool(row["relative_error"] <= args.parity_rtol
                     and row["top1_agreement"] == 1.0
                     and row["keras_params"] == row["params"])
    report.data["parity"].append(row)
    report.write()
    print(f"  {arch:10s} vs timm {row['timm_name']}: max|Δlogit| "
          f"{row['max_abs_diff']:.3g} (max|logit| {row['max_abs_logit']:.3g}, "
          f"rel {row['relative_error']:.2e}), mean|Δ| {row['mean_abs_diff']:.2e}, "
          f"top-1 agreement {row['top1_agreement']:.3f}, params "
          f"{row['keras_params']:,} vs {row['params']:,} -> "
          f"{'OK' if row['ok'] else 'MISMATCH'} ({seconds:.0f}s)", flush=True)
    del model
    gc.collect()
    return seconds


class _WindowClock:
    """`fit` callback: the time at each epoch end, after the loss is on the host."""

    def __init__(self):
        import keras

        clock = self

        class Callback(keras.callbacks.Callback):
            # Only on_epoch_end is overridden, so per-step logs stay asynchronous;
            # Keras hands on_epoch_end host floats, which blocks on the last step.
            def on_train_begin(self, logs=None):
                clock.times = [time.perf_counter()]
                clock.losses = []

            def on_epoch_end(self, epoch, logs=None):
                clock.losses.append(float(logs["loss"]))
                clock.times.append(time.perf_counter())

        self.callback = Callback()
        self.times: list[float] = []
        self.losses: list[float] = []


def _build_distiller(policy: str, args: argparse.Namespace, teacher: tuple[str, int],
                     student: tuple[str, int], fold_teacher: bool = False):
    """A compiled `Distiller` of random BiT models, `teacher`/`student` = (constructor, size).

    `fold_teacher` folds the teacher's weight standardization into its kernels,
    as `funmatch distill` builds a frozen BiT teacher (`models.fold_if_standardized`).
    """
    import keras

    from funmatch_keras import models
    from funmatch_keras.distiller import Distiller
    from funmatch_keras.optim import optimizers as optim

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(args.seed)
        teacher_model = getattr(models, teacher[0])(NUM_CLASSES, image_size=teacher[1])
        student_model = getattr(models, student[0])(NUM_CLASSES, image_size=student[1])
        # BiT zero-initializes the head: random teacher logits give a real loss.
        head = teacher_model.get_layer("head_logits")
        head.kernel.assign(keras.random.normal(head.kernel.shape, seed=args.seed)
                           / np.sqrt(head.kernel.shape[0]))
        if fold_teacher:
            teacher_model = models.fold_if_standardized(teacher_model)
        distiller = Distiller(teacher_model, student_model, temperature=1.0)
        # As train.py compiles it (paper AdamW, warmup + cosine, XLA on JAX).
        distiller.compile(optimizer=optim.adamw(1e-3, 1e-4, total_steps=10_000,
                                                warmup_steps=10),
                          jit_compile=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return distiller


def _device_images(batch: int, size: int, seed: int):
    """A device-resident random batch in [-1, 1], NHWC float32."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.device_put(rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype("float32"))


def _time_config(distiller, policy: str, x: Any, batch: int, args: argparse.Namespace,
                 **describe: Any) -> dict[str, Any]:
    """Times `distiller.fit` on the device-resident batch `x` (any Distiller input) repeated.

    One warm-up window (compiles), then `args.windows` windows of `args.steps`
    steps. `describe` (image sizes, ...) goes into the row as given.
    """
    import jax

    def batches():  # (x,): no labels, function matching
        while True:
            yield (x,)

    clock = _WindowClock()
    previous = _matmul_precision()
    if policy == "float32" and args.fp32_precision:
        jax.config.update("jax_default_matmul_precision", args.fp32_precision)
    try:
        distiller.fit(batches(), steps_per_epoch=args.steps, epochs=1 + args.windows,
                      callbacks=[clock.callback], shuffle=False, verbose=0)
    finally:
        jax.config.update("jax_default_matmul_precision", previous)
    windows = np.diff(clock.times)
    step_s = [w / args.steps for w in windows[1:]]
    median = statistics.median(step_s)
    return {
        "policy": policy, "batch": batch, **describe, "steps_per_window": args.steps,
        "windows": len(step_s),
        "fp32_precision": (args.fp32_precision or "default") if policy == "float32" else None,
        "median_step_ms": 1e3 * median, "min_step_ms": 1e3 * min(step_s),
        "max_step_ms": 1e3 * max(step_s), "window_step_ms": [1e3 * s for s in step_s],
        "images_per_s": batch / median,
        "first_window_s": float(windows[0]),
        "compile_s_estimate": float(windows[0] - args.steps * median),
        "losses": clock.losses, "finite": bool(np.all(np.isfinite(clock.losses))),
        "peak_bytes_in_use_so_far": _peak_bytes(),
    }


def run_throughput(args: argparse.Namespace, report: Report) -> None:
    import keras

    size = args.size
    distillers: dict[str, Any] = {}
    compile_s: list[float] = []
    configs = [(b, p) for b in args.batches for p in POLICIES]
    for i, (batch, policy) in enumerate(configs):
        what = f"throughput {policy} batch {batch}"
        if i and not report.fits(1.5 * max(compile_s or [60.0]) + 10.0, what):
            continue
        t0 = time.perf_counter()
        try:
            if policy not in distillers:
                distillers[policy] = _build_distiller(policy, args, ("bit_r101x1", size),
                                                      ("bit_r50x1", size))
            row = _time_config(distillers[policy], policy, _device_images(batch, size, args.seed),
                               batch, args, image_size=size)
        except Exception as error:  # e.g. RESOURCE_EXHAUSTED at a large batch
            report.skip(what, f"{type(error).__name__}: {str(error)[:300]}")
            gc.collect()
            continue
        row["seconds"] = round(time.perf_counter() - t0, 1)
        compile_s.append(row["seconds"])
        report.data["throughput"].append(row)
        peak = row["peak_bytes_in_use_so_far"]
        print(f"  {policy:15s} batch {batch:4d} @ {size}px: {row['median_step_ms']:8.2f} ms/step "
              f"(min {row['min_step_ms']:.2f}, max {row['max_step_ms']:.2f}), "
              f"{row['images_per_s']:9.1f} img/s, first window {row['first_window_s']:.1f}s, "
              f"loss {row['losses'][-1]:.4f}"
              + (f", peak so far {peak / 2**30:.1f} GiB" if peak else "")
              + f" ({row['seconds']:.0f}s)", flush=True)
        by_policy = {r["policy"]: r for r in report.data["throughput"] if r["batch"] == batch}
        if set(by_policy) == set(POLICIES):
            ratio = by_policy["float32"]["median_step_ms"] / by_policy["mixed_bfloat16"][
                "median_step_ms"]
            report.data.setdefault("bf16_speedup", {})[str(batch)] = round(float(ratio), 3)
            print(f"  -> batch {batch}: bf16/fp32 throughput ratio {ratio:.2f}x "
                  "(fp32 ms/step over bf16 ms/step)", flush=True)
        report.write()
    del distillers
    keras.backend.clear_session()
    gc.collect()


def _pair_stage(distiller, policy: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """The paper's pair at one (batch, policy): the live step, then the replayed one."""
    import jax

    from funmatch_keras.distiller import STUDENT_KEY, TEACHER_KEY, TEACHER_LOGITS_KEY

    t_size, s_size = args.pair_teacher_size, args.pair_student_size
    # Cross-resolution: the student sees the teacher's images, resized.
    teacher_images = _device_images(batch, t_size, args.seed)
    student_images = jax.image.resize(teacher_images, (batch, s_size, s_size, 3), "bilinear")
    sizes = {"teacher_size": t_size, "student_size": s_size}
    live = _time_config(distiller, policy, {STUDENT_KEY: student_images,
                                            TEACHER_KEY: teacher_images},
                        batch, args, **sizes)
    # What a teacher store replays: the teacher's logits for these very images,
    # computed once and kept on the device (reading the store is host-side I/O).
    t0 = time.perf_counter()
    logits = jax.block_until_ready(distiller.teacher_logits({TEACHER_KEY: teacher_images}))
    logits_s = time.perf_counter() - t0
    replayed = _time_config(distiller, policy, {STUDENT_KEY: student_images,
                                                TEACHER_LOGITS_KEY: logits},
                            batch, args, **sizes)
    ratio = float(replayed["median_step_ms"] / live["median_step_ms"])
    return {
        "policy": policy, "batch": batch, "teacher": PAIR[0], "student": PAIR[1], **sizes,
        "teacher_folded": True, "live": live, "replayed": replayed,
        "teacher_logits_s": logits_s, "replay_over_live": ratio, "teacher_share": 1.0 - ratio,
        "finite": bool(live["finite"] and replayed["finite"]
                       and np.all(np.isfinite(np.asarray(logits)))),
    }


def run_pair(args: argparse.Namespace, report: Report) -> None:
    """Part (c): the paper's pair, live vs replayed, per batch size and policy."""
    import keras

    distillers: dict[str, Any] = {}
    stage_s: list[float] = []
    configs = [(b, p) for b in args.pair_batches for p in POLICIES]
    for i, (batch, policy) in enumerate(configs):
        what = f"pair {policy} batch {batch}"
        if i and not report.fits(1.5 * max(stage_s or [120.0]) + 10.0, what):
            continue
        t0 = time.perf_counter()
        try:
            if policy not in distillers:
                distillers[policy] = _build_distiller(
                    policy, args, (PAIR[0], args.pair_teacher_size),
                    (PAIR[1], args.pair_student_size), fold_teacher=True)
            row = _pair_stage(distillers[policy], policy, batch, args)
        except Exception as error:  # e.g. RESOURCE_EXHAUSTED at a large batch
            report.skip(what, f"{type(error).__name__}: {str(error)[:300]}")
            gc.collect()
            continue
        row["seconds"] = round(time.perf_counter() - t0, 1)
        stage_s.append(row["seconds"])
        report.data["pair"].append(row)
        key = f"{policy} batch {batch}"
        report.data.setdefault("pair_teacher_share", {})[key] = round(row["teacher_share"], 3)
        report.write()
        for name in ("live", "replayed"):
            timing = row[name]
            print(f"  {policy:15s} batch {batch:4d} {name:8s}: {timing['median_step_ms']:8.2f} "
                  f"ms/step (min {timing['min_step_ms']:.2f}, max {timing['max_step_ms']:.2f}), "
                  f"{timing['images_per_s']:9.1f} img/s, first window "
                  f"{timing['first_window_s']:.1f}s, loss {timing['losses'][-1]:.4f}",
                  flush=True)
        peak = row["replayed"]["peak_bytes_in_use_so_far"]
        print(f"  -> replayed/live {row['replay_over_live']:.3f}, teacher share "
              f"{row['teacher_share']:.3f}; teacher logits once in {row['teacher_logits_s']:.1f}s"
              + (f", peak so far {peak / 2**30:.1f} GiB" if peak else "")
              + f" ({row['seconds']:.0f}s)", flush=True)
    del distillers
    keras.backend.clear_session()
    gc.collect()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Path of the JSON report.")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 32 px, batch 4, 2 steps, R50 parity at 64 px, "
                             "the pair at 48 -> 32 px, batch 2.")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="Skip later stages that would end past this many seconds. "
                             "Defaults to 420 (none with --quick).")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-pair", action="store_true")
    parser.add_argument("--parity-archs", nargs="+", choices=sorted(ARCHS),
                        default=None, help="Defaults to both (bit_r50x1 alone with --quick).")
    parser.add_argument("--parity-size", type=int, default=None,
                        help="Defaults to 128 (64 with --quick).")
    parser.add_argument("--parity-batch", type=int, default=None,
                        help="Defaults to 16 (2 with --quick).")
    parser.add_argument("--parity-rtol", type=float, default=1e-3,
                        help="Max |Δlogit| / max |logit| to call parity OK.")
    parser.add_argument("--size", type=int, default=None,
                        help="Throughput image size. Defaults to 128 (32 with --quick).")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="Global batch sizes. Defaults to 128 256 (4 with --quick).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Steps per timed window. Defaults to 10 (2 with --quick).")
    parser.add_argument("--windows", type=int, default=None,
                        help="Timed windows after the warm-up one. Defaults to 5 (2 with --quick).")
    parser.add_argument("--pair-teacher-size", type=int, default=None,
                        help=f"{PAIR[0]}'s image size. Defaults to 224 (48 with --quick).")
    parser.add_argument("--pair-student-size", type=int, default=None,
                        help=f"{PAIR[1]}'s image size. Defaults to 160 (32 with --quick).")
    parser.add_argument("--pair-batches", type=int, nargs="+", default=None,
                        help="The pair's global batch sizes. Defaults to 64 128 (2 with --quick).")
    parser.add_argument("--fp32-precision", choices=["default", "high", "highest"], default=None,
                        help="jax_default_matmul_precision for the float32 throughput run. "
                             "Defaults to JAX's default (may use TF32 on the GPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-reference", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"parity_archs": ["bit_r50x1"] if quick else ["bit_r50x1", "bit_r101x1"],
                "parity_size": 64 if quick else 128, "parity_batch": 2 if quick else 16,
                "size": 32 if quick else 128, "batches": [4] if quick else [128, 256],
                "steps": 2 if quick else 10, "windows": 2 if quick else 5,
                "pair_teacher_size": 48 if quick else 224,
                "pair_student_size": 32 if quick else 160,
                "pair_batches": [2] if quick else [64, 128],
                # A CPU smoke run is about completeness, not time.
                "budget_s": 1e9 if quick else 420.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.torch_reference:
        torch_reference(args.torch_reference, args.parity_archs, args.seed)
        return 0
    os.environ.setdefault("KERAS_BACKEND", "jax")
    start = time.perf_counter()
    import keras

    if keras.backend.backend() != "jax":
        print(f"This check needs KERAS_BACKEND=jax (got {keras.backend.backend()!r}).")
        return 2
    # The funmatch_keras pieces used here must not need TensorFlow (the GPU
    # machine has none). Checked right after importing them: later,
    # keras.utils.set_random_seed imports TensorFlow itself wherever it is installed.
    import funmatch_keras.distiller  # noqa: F401
    import funmatch_keras.models  # noqa: F401
    import funmatch_keras.optim.optimizers  # noqa: F401

    tf_imported = "tensorflow" in sys.modules
    report = Report(args.out, start, args.budget_s)
    report.data["tensorflow_imported_by_funmatch_keras"] = tf_imported
    report.data["args"] = {k: v for k, v in vars(args).items() if k != "torch_reference"}
    report.data["environment"] = env = _environment()
    print(f"gpu_check: jax {env['jax']}, keras {env['keras']}, {env['device_count']} x "
          f"{env['device_kind']} ({env['platform']}), python {env['python']}", flush=True)
    if env["platform"] != "gpu" and not args.quick:
        print("  WARNING: no GPU visible to JAX; timings below are not GPU timings.")
    report.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        meta = None
        if not args.skip_parity:
            print(f"(a) timm parity ({args.parity_size}px, batch {args.parity_batch}; "
                  "float32, highest matmul precision, TF32 off in torch)", flush=True)
            meta = prepare_parity(args, report, workdir)
        # The first model's parity, the pair, the throughput, then further models
        # if time allows. The pair comes before (b): its stages cost the most, and
        # (b)'s first stage runs whatever the budget.
        parity_s = check_parity(args, report, workdir, meta, args.parity_archs[0]) if meta else 0
        if not args.skip_pair:
            print(f"(c) the paper's pair: {PAIR[0]} teacher (folded) at {args.pair_teacher_size}"
                  f"px -> {PAIR[1]} student at {args.pair_student_size}px, live (both models "
                  "step) vs replayed (stored teacher logits fed on the device; reading the "
                  f"store is host I/O, not timed), {args.windows} windows x {args.steps} steps "
                  "after a warm-up window", flush=True)
            run_pair(args, report)
        if not args.skip_throughput:
            print(f"(b) Distiller step: BiT-R101x1 teacher -> BiT-R50x1 student, "
                  f"{args.size}px, fit on a device-resident batch, {args.windows} windows x "
                  f"{args.steps} steps after a warm-up window", flush=True)
            run_throughput(args, report)
        for arch in args.parity_archs[1:] if meta else []:
            if report.fits(2.0 * parity_s, f"parity {arch}"):
                print("(a) timm parity, continued", flush=True)
                check_parity(args, report, workdir, meta, arch)
    # A part fails when it ran and disagreed, or was asked for and gave nothing
    # (parity where torch/timm are not installed, the CPU smoke run, is not run).
    parity, throughput, pair = (report.data[k] for k in ("parity", "throughput", "pair"))
    parity_ok = all(row["ok"] for row in parity) and bool(
        parity or args.skip_parity or report.data.get("parity_unavailable"))
    finite = all(row["finite"] for row in throughput) and bool(
        throughput or args.skip_throughput)
    pair_finite = all(row["finite"] for row in pair) and bool(pair or args.skip_pair)
    report.data["ok"] = bool(parity_ok and finite and pair_finite and not tf_imported)
    report.write()
    parity_word = ("not run" if not parity else "OK" if parity_ok else "MISMATCH")
    print(f"summary: {'OK' if report.data['ok'] else 'FAILED'}; parity {parity_word} "
          f"({len(parity)} models); throughput losses "
          f"{'finite' if finite else 'NOT finite or missing'} ({len(throughput)} configs); "
          f"bf16 speedup by batch {report.data.get('bf16_speedup', {})}; pair losses "
          f"{'finite' if pair_finite else 'NOT finite or missing'} ({len(pair)} configs), "
          f"teacher share {report.data.get('pair_teacher_share', {})}; "
          f"{len(report.data['skipped'])} skipped; TensorFlow imported by funmatch_keras: "
          f"{tf_imported}; {report.elapsed():.0f}s"
          + (f"; JSON: {args.out}" if args.out else ""), flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
