"""Tests for funmatch_keras.tuning.hardware on crafted /proc/cpuinfo texts."""

import pytest

from funmatch_keras.tuning import hardware

_SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_bf16 amx_bf16 amx_tile avx_vnni
"""
_ZEN2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx2 fma f16c
"""


@pytest.mark.parametrize("text, flags, native", [
    (_SAPPHIRE_RAPIDS, ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "avx_vnni",
                        "f16c", "fma"], True),
    (_ZEN2, ["avx2", "f16c", "fma"], False),
    ("", [], False),  # not Linux
])
def test_flags_and_native_bfloat16(monkeypatch, text, flags, native):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: text)
    assert hardware.cpu_flags() == flags
    assert hardware.native_bfloat16_cpu() is native


def test_describe_names_model_and_flags(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: _ZEN2)
    assert hardware.describe() == "AMD EPYC 7B12; flags avx2 f16c fma"
