"""The app: a config and a workdir turned into calls of the library.

One module per command: `distill`, `train_teacher`, `evaluate`, `export`, `demo`, and
`cli` (the `funmatch` command); `build` (config → sources, models, optimizer),
`compute_path` (the run's teacher path), `workdir` and `workdir_lock` (a run's files,
one run per workdir). Nothing in the library imports this package.
"""
