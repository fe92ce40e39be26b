"""The `funmatch` command: `funmatch <command> [--flags]`.

Commands:
  demo      the whole recipe offline on the bundled digits (teacher, distilled
            student, label-trained baseline), with a table and a plot
  distill   distill a student as a config says (--config=pets37:variant=fast,
            --config.FIELD=VALUE overrides); rerun the same command to resume
  train-teacher
            fine-tune a teacher with labels (BiT-HyperRule) into <workdir>/teacher.keras
  evaluate  a workdir's student (and teacher) on a split: top-1, agreement, KL
  teacher-store
            record a config's teacher logits per step once, for a sweep's runs
            (--config.teacher_store=DIR replays them); --steps=A:B splits the work
  export    ship a workdir's student as .keras / SavedModel / TFLite with parity checks

Run `funmatch <command> --help` for a command's flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Exit codes: 0 done, 2 bad input (the message says the fix), 3 training stopped
# early (NaN; the last good checkpoint is kept), 4 stopped by SIGTERM/SIGINT after
# saving a checkpoint (rerun the same command to resume), 5 no space left to
# write a checkpoint (older ones are intact; free space and rerun).
EXIT_BAD_INPUT, EXIT_TRAINING_STOPPED, EXIT_PREEMPTED, EXIT_NO_SPACE = 2, 3, 4, 5


def _demo(args: argparse.Namespace) -> int:
    from funmatch_keras.app.demo import run_demo

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.teacher_epochs is not None:
        overrides["teacher_epochs"] = args.teacher_epochs
    run_demo(args.workdir, verbose=args.verbose, **overrides)
    out = args.workdir
    print(f"Wrote {out}/student.keras, {out}/demo.png and {out}/report.json.")
    return 0


def _config(args: argparse.Namespace):
    from funmatch_keras import configs

    # Validated by the command itself (`train.run`, `supervised.train_teacher`).
    return configs.apply_overrides(configs.load_config(args.config), args.overrides)


def _distill(args: argparse.Namespace) -> int:
    from funmatch_keras.app import distill as train

    train.run(_config(args), args.workdir, overwrite=args.overwrite, verbose=args.verbose,
              strategy=args.strategy)
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from funmatch_keras.app import train_teacher as supervised

    supervised.train_teacher(_config(args), args.workdir, verbose=args.verbose,
                             overwrite=args.overwrite, strategy=args.strategy)
    return 0


def _teacher_store(args: argparse.Namespace) -> int:
    from funmatch_keras.app import teacher_store as teacher_store_run

    done = teacher_store_run.fill_for_config(_config(args), args.store, args.steps, args.verbose)
    print(f"Teacher store {done['store']}: steps {done['steps'][0]}-{done['steps'][1] - 1}, "
          f"{done['chunks_computed']} chunk(s) computed here, {done['chunks_missing']} missing.")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from funmatch_keras.app import evaluate

    logs = evaluate.evaluate_workdir(args.workdir, split=args.split)
    print("  ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())))
    return 0


def _export(args: argparse.Namespace) -> int:
    from funmatch_keras.app.export import run_export
    from funmatch_keras.export.formats import ExportError, format_report

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        report = run_export(args.workdir, formats, overwrite=args.overwrite,
                            num_images=args.num_images, out_dir=args.output_dir)
    except ExportError as error:  # the model cannot be converted; the message says why
        print(f"funmatch export: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_report(report))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value} (default: 500)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="funmatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    demo = commands.add_parser("demo", help="offline demo on the bundled digits")
    demo.add_argument("--workdir", default="demo_out", help="output directory")
    demo.add_argument("--epochs", type=int, default=None,
                      help="student epochs (default: the digits config's)")
    demo.add_argument("--teacher_epochs", type=int, default=None,
                      help="teacher epochs (default: the digits config's)")
    demo.add_argument("--verbose", type=int, default=2, help="Keras verbosity: 0, 1 or 2")
    demo.set_defaults(run=_demo)

    def config_command(name, run, help, workdir_help):
        command = commands.add_parser(name, help=help)
        command.add_argument("--config", required=True, help="a config name with options "
                             "(pets37:variant=fast) or a .py file; --config.FIELD=VALUE overrides")
        command.add_argument("--workdir", required=True, help=workdir_help)
        command.add_argument("--overwrite", action="store_true",
                             help="start from nothing: delete the workdir's previous run "
                             "(config, checkpoints, trained teacher, logs, report) first; "
                             "without it a workdir of another config is refused")
        command.add_argument("--verbose", type=int, default=1, help="Keras verbosity: 0, 1 or 2")
        command.add_argument("--strategy", default=None, help="auto (default: TPU, then "
                             "several GPUs, then TF_CONFIG workers), tpu, mirrored, "
                             "multi_worker, default; JAX: auto, data_parallel, default. "
                             "Env: FUNMATCH_STRATEGY")
        command.set_defaults(run=run)
        return command

    config_command("distill", _distill, "distill a student from a config",
                   "checkpoints, logs, student, report")
    config_command("train-teacher", _train_teacher, "fine-tune a teacher with labels",
                   "checkpoints and teacher.keras")

    store = commands.add_parser("teacher-store", help="record a config's teacher logits once")
    store.add_argument("--config", required=True, help="the config of the sweep's runs, "
                       "as for `funmatch distill`; --config.FIELD=VALUE overrides")
    store.add_argument("--store", required=True, help="the store directory "
                       "(--config.teacher_store of the runs)")
    store.add_argument("--steps", default=None, help="A:B, the global steps to compute "
                       "(default: the whole run); split a run over processes or machines")
    store.add_argument("--verbose", type=int, default=1, help="0 or 1")
    store.set_defaults(run=_teacher_store)

    evaluate = commands.add_parser("evaluate", help="evaluate a workdir's student and teacher")
    evaluate.add_argument("--workdir", required=True, help="a workdir of `funmatch distill`")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser("export", help="export a trained student")
    export.add_argument("--workdir", required=True, help="a workdir holding student.keras")
    export.add_argument("--formats", default="keras,saved_model,tflite_fp32,tflite_fp16,"
                        "tflite_dynamic,tflite_int8",
                        help="comma-separated artifact kinds; also onnx (the [onnx] extra)")
    export.add_argument("--num_images", type=_positive_int, default=500,
                        help="eval images for parity checks and int8 calibration (>= 1)")
    export.add_argument("--output_dir", default=None,
                        help="where the artifacts go (default: <workdir>/export), e.g. "
                        "when the workdir cannot be written")
    export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    export.set_defaults(run=_export)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.FIELD=VALUE` overrides from the other flags.

    An override without `=` is bad input (exit 2); the message writes the fix.
    """
    rest, overrides = [], {}
    for position, arg in enumerate(argv):
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                following = argv[position + 1] if position + 1 < len(argv) else ""
                value = following if following and not following.startswith("-") else "VALUE"
                print(f"funmatch: error: {arg} has no value: write it with '=', as "
                      f"--config.{key}={value}", file=sys.stderr)
                raise SystemExit(EXIT_BAD_INPUT)
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    rest, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    from funmatch_keras.training.checkpoint_format import CheckpointWriteError
    from funmatch_keras.training.loop import Preempted, TrainingError

    try:
        return args.run(args)
    except CheckpointWriteError as error:  # disk full; older checkpoints intact
        print(f"funmatch {args.command}: error: {error}", file=sys.stderr)
        return EXIT_NO_SPACE
    except Preempted as error:  # SIGTERM/SIGINT: saved; the same command resumes
        print(f"funmatch {args.command}: {error}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingError as error:  # stopped early (NaN); checkpoints are intact
        print(f"funmatch {args.command}: {error}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as error:
        print(f"funmatch {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
