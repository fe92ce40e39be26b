"""The demo's setting over several seeds: mean and std of each row of its table.

`funmatch demo` runs one seed; this runs the same setting (`run_demo`, the
digits config plus any `--set FIELD=VALUE`) once per seed, each seed changing
the data split's shuffle, the teacher's and the students' initial weights and
the augmentation, and reports for the teacher, the label-trained student and
the distilled student the mean ± std of test top-1 and of agreement with the
teacher, and the distilled-minus-label gap. The README's demo table is this
script's output, and so is `funmatch_keras.app.demo.REFERENCE` (printed as a
Python literal to paste there), which the demo prints beside its own run. The
last line is JSON.

Usage:
    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--set student=cnn:8,16,32 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402

from funmatch_keras.app.demo import ROWS, run_demo  # noqa: E402
from funmatch_keras.tuning import hardware  # noqa: E402


def summarize(reports: list[dict]) -> dict:
    """Mean and (sample) std over seeds of each row's top-1 and agreement.

    >>> row = lambda t: {"top1": t, "agreement": 1.0, "params": 5}
    >>> reports = [{"results": {n: row(t) for n in ROWS}} for t in (0.9, 0.92)]
    >>> s = summarize(reports)
    >>> s["distilled student"]["top1_mean"], s["gap_mean"], s["gap_min"]
    (0.91, 0.0, 0.0)
    """
    summary = {}
    for name in ROWS:
        cells = [report["results"][name] for report in reports]
        summary[name] = {"params": cells[0]["params"]}
        for key in ("top1", "agreement"):
            values = [cell[key] for cell in cells]
            summary[name][f"{key}_mean"] = round(statistics.fmean(values), 5)
            summary[name][f"{key}_std"] = round(
                statistics.stdev(values) if len(values) > 1 else 0.0, 5)
    gaps = [r["results"]["distilled student"]["top1"]
            - r["results"]["label-trained student"]["top1"]
            for r in reports]
    summary["gap_mean"] = round(statistics.fmean(gaps), 5)
    summary["gap_min"] = round(min(gaps), 5)
    summary["teacher_gap_mean"] = round(
        summary["teacher"]["top1_mean"] - summary["distilled student"]["top1_mean"], 5)
    return summary


def format_summary(summary: dict, seeds: list[int]) -> str:
    lines = [f"| model | params | test top-1 (mean ± std, {len(seeds)} seeds) | agreement |",
             "|---|---:|---:|---:|"]
    for name in ROWS:
        row = summary[name]
        lines.append(f"| {name} | {row['params']:,} | {row['top1_mean']:.2%} ± "
                     f"{row['top1_std']:.2%} | {row['agreement_mean']:.2%} ± "
                     f"{row['agreement_std']:.2%} |")
    lines.append(f"distilled − label-trained: {summary['gap_mean']:+.2%} mean, "
                 f"{summary['gap_min']:+.2%} worst seed; teacher − distilled: "
                 f"{summary['teacher_gap_mean']:+.2%}")
    return "\n".join(lines)


def machine() -> str:
    """The machine in a few words: CPU model, cores, and its AVX2/bf16 flags.

    The flags are those of `grep -o -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo`.
    """
    flags = [f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in hardware.cpu_flags()]
    return f"{hardware.cpu_model()}, {os.cpu_count()} cores, {' '.join(flags) or 'no AVX2'}"


def reference_literal(summary: dict, seeds: list[int], machine: str) -> str:
    """`summary` as the `REFERENCE` constant of `funmatch_keras/app/demo.py`.

    >>> row = {"top1_mean": 0.9, "top1_std": 0.01, "agreement_mean": 1.0, "agreement_std": 0.0}
    >>> summary = {**{name: row for name in ROWS}, "gap_mean": 0.012, "gap_min": 0.005}
    >>> literal = reference_literal(summary, [0, 1], "CPU")
    >>> eval(literal.split(" = ", 1)[1])["gap"]
    (0.012, 0.005)
    """
    def pairs(key):
        return ", ".join(f"{name!r}: ({summary[name][key + '_mean']}, "
                         f"{summary[name][key + '_std']})" for name in ROWS)

    return (f"REFERENCE = {{'seeds': {tuple(seeds)!r}, 'machine': {machine!r}, "
            f"'top1': {{{pairs('top1')}}}, 'agreement': {{{pairs('agreement')}}}, "
            f"'gap': ({summary['gap_mean']}, {summary['gap_min']})}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="A digits config override (repeatable).")
    parser.add_argument("--workdir", default=None, help="Defaults to a temporary directory.")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = dict(item.split("=", 1) for item in args.set)
    root = args.workdir or tempfile.mkdtemp(prefix="demo_seeds_")
    reports, start = [], time.time()
    for seed in seeds:
        keras.backend.clear_session()
        report = run_demo(os.path.join(root, f"seed{seed}"), verbose=0,
                          **{**overrides, "seed": seed})
        reports.append(report)
        print(f"seed {seed}: {report['wall_time_s']:.0f} s", flush=True)
    summary = summarize(reports)
    print(format_summary(summary, seeds))
    print(f"overrides {overrides or 'none'}; {time.time() - start:.0f} s for {len(seeds)} seeds; "
          f"{common.machine_line()}")
    print(reference_literal(summary, seeds, machine()))
    common.print_result({"seeds": seeds, "overrides": overrides, **summary,
                         "seconds_per_seed": round((time.time() - start) / len(seeds), 1)})


if __name__ == "__main__":
    main()
