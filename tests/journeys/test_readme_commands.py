"""The README's other command blocks: every `funmatch` command in it is one the CLI takes
(subcommand, flags, config, overrides), and the demo followed by the README's export block
runs as written."""

import json

import pytest

# Parses each command as `funmatch` would, and loads and validates its config with the
# overrides, without training: a README whose flags or fields drift from the code fails.
_CHECK_COMMANDS = """
import json
from funmatch_keras import configs
from funmatch_keras.app import cli
failures = []
for argv in json.load(open("commands.json")):
    try:
        rest, overrides = cli._split_overrides(argv[1:])
        args = cli.build_parser().parse_args(rest)
        if hasattr(args, "config"):
            configs.validate(configs.apply_overrides(configs.load_config(args.config),
                                                     overrides))
    except BaseException as error:  # argparse exits; configs raise
        failures.append(f"{' '.join(argv)}: {type(error).__name__}: {error}")
print("FAILURES", json.dumps(failures))
"""


def test_every_readme_funmatch_command_is_one_the_cli_takes(shell, readme_funmatch_commands):
    subcommands = {argv[1] for argv in readme_funmatch_commands}
    assert {"distill", "train-teacher", "evaluate", "export"} <= subcommands
    (shell.cwd / "commands.json").write_text(json.dumps(readme_funmatch_commands))
    result = shell.python(_CHECK_COMMANDS)
    failures = json.loads(result.stdout.split("FAILURES", 1)[1])
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_the_demo_then_the_readme_export_block(shell, readme):
    # `make demo` runs `funmatch demo --workdir=demo_out`; fewer epochs here.
    shell.funmatch("demo", "--workdir=demo_out", "--epochs=1", "--teacher_epochs=1",
                   "--verbose=0")
    for name in ("student.keras", "demo.png", "report.json"):
        assert (shell.cwd / "demo_out" / name).is_file(), name
    commands = readme.commands_after("## Export")
    assert all(c[:2] == ["funmatch", "export"] for c in commands), commands
    formats = set()
    for command in commands:
        shell.funmatch(*command[1:], "--num_images=100")
        formats |= set(next(a for a in command if a.startswith("--formats=")).split("=")[1]
                       .split(","))
    report = json.loads((shell.cwd / "demo_out" / "export" / "export_report.json").read_text())
    # Every format exported by either command keeps its parity record.
    assert formats <= set(report["artifacts"]), sorted(report["artifacts"])
