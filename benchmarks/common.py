"""What the benchmark scripts share: the machine line, medians and ratios, the result line.

Each script prints `machine_line()` first and its result last, as one JSON
object (`print_result`): the tests and the README's tables read that line.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Iterable

from funmatch_keras.tuning import hardware


def machine_line() -> str:
    """The machine in one line: CPU model, cores, the SIMD flags that decide its speed."""
    return f"cpu: {hardware.describe()}; {os.cpu_count()} cores"


def machine() -> dict[str, Any]:
    """The machine for a result: CPU model, cores, SIMD flags."""
    return {"cpu": hardware.cpu_model(), "cores": os.cpu_count(),
            "cpu_flags": hardware.cpu_flags()}


def median_ms(seconds: Iterable[float]) -> float:
    """The median of `seconds`, in milliseconds."""
    return 1e3 * statistics.median(seconds)


def ratio(numerator: float, denominator: float, digits: int = 3) -> float:
    """`numerator / denominator`, rounded: a speedup or an overhead."""
    return round(numerator / denominator, digits)


def print_result(result: dict[str, Any]) -> None:
    """Prints `result` as the script's last line, one JSON object."""
    print(json.dumps(result, default=str), flush=True)
