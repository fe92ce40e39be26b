"""What this machine's CPU can do fast: its SIMD flags, its model name, native bfloat16.

bfloat16 and XLA win or lose with the CPU (a bf16 matmul runs at twice the
fp32 rate with AVX512_BF16 or AMX, and slower than fp32 with AVX2 alone), so
benchmarks print these and a compute path can be chosen by them.

Example:
>>> isinstance(cpu_flags(), list), isinstance(native_bfloat16(), bool)
(True, True)
"""

from __future__ import annotations

import platform

import keras

# The flags that decide matmul and bfloat16 speed.
_RELEVANT = ("avx2", "fma", "f16c", "avx512", "amx", "avx_vnni")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    """The SIMD flags of `/proc/cpuinfo` that matter for speed, sorted ([] elsewhere)."""
    line = next((line for line in _cpuinfo().splitlines() if line.startswith("flags")), "")
    return sorted(f for f in set(line.split(":", 1)[-1].split()) if f.startswith(_RELEVANT))


def cpu_model() -> str:
    """The CPU's model name, e.g. `"AMD EPYC 9B14"`."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def native_bfloat16_cpu() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16)."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def native_bfloat16() -> bool:
    """Whether the device Keras computes on has native bfloat16.

    A TPU, an NVIDIA GPU of compute capability 8.0 or more (tensor cores with
    bf16), or else the CPU (`native_bfloat16_cpu`).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "tpu":
            return True
        if device.platform == "gpu":
            return float(getattr(device, "compute_capability", 0) or 0) >= 8.0
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return True
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            capability = tf.config.experimental.get_device_details(gpus[0]).get(
                "compute_capability", (0, 0))
            return tuple(capability) >= (8, 0)
    return native_bfloat16_cpu()


def describe() -> str:
    """One line for benchmark output: model and the flags that matter.

    >>> "flags" in describe()
    True
    """
    return f"{cpu_model()}; flags {' '.join(cpu_flags()) or 'none'}"
