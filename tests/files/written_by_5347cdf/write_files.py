"""Writes this folder's files with the package as it was before the layout change.

The files test that what the earlier version wrote still works with this one
(`tests/journeys/test_files_from_an_earlier_version.py`): one `.keras` file per
class the package registers with Keras (saved as users saved them, optimizer
included), its input and the logits that version computed, and a
`funmatch distill` workdir killed (`os._exit`, as kill -9) right after its
step-2 checkpoint, less its `.lock` (which names the machine that wrote it).
Made once, by:

    git worktree add /tmp/pre_layout 5347cdf
    cd /tmp/pre_layout && PYTHONPATH=/tmp/pre_layout \\
        python /path/to/tests/files/written_by_5347cdf/write_files.py OUT_DIR
    rm OUT_DIR/workdir/.lock

It imports the earlier module paths (`funmatch_keras.supervised`,
`funmatch_keras.checkpoint_callback`), so it runs against that commit only.
"""

import json
import os
import sys


def _models(out):
    import keras
    import numpy as np

    import funmatch_keras as fm
    from funmatch_keras.models.bit import StdConv2D
    from funmatch_keras.supervised import bit_hyperrule_optimizer

    size, classes = 16, 5
    x = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype("float32")
    labels = np.arange(4) % classes

    def cnn():
        return fm.models.small_cnn([4, 8], num_classes=classes, image_size=size)

    def trained(model, optimizer, loss="sparse_categorical_crossentropy"):
        model.compile(optimizer=optimizer, loss=loss)
        model.fit(x, labels, batch_size=4, epochs=1, verbose=0)
        return model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    hidden = StdConv2D(6, 3, name="std_conv")(inputs)
    std_conv = keras.Model(inputs, keras.layers.Dense(classes)(
        keras.layers.GlobalAveragePooling2D()(hidden)))
    kl = cnn()
    kl.compile(optimizer="adam", loss=fm.DistillationKL(temperature=3.0))
    files = {
        "StdConv2D": std_conv,
        "DistillationKL": kl,
        "Shampoo": trained(cnn(), fm.optim.shampoo(
            1e-2, 1e-5, total_steps=10, block_size=16, precondition_every=1,
            start_preconditioning_step=1)),
        "BitHyperRuleSchedule": trained(cnn(), bit_hyperrule_optimizer(batch_size=512,
                                                                        total_steps=100)),
    }
    np.save(os.path.join(out, "x.npy"), x)
    for name, model in files.items():
        model.save(os.path.join(out, f"{name}.keras"))
        np.save(os.path.join(out, f"{name}.logits.npy"), np.asarray(model(x)))


def _killed_workdir(out):
    from funmatch_keras import cli
    from funmatch_keras.checkpoint_callback import CheckpointCallback

    original = CheckpointCallback._save

    def save_then_die(self, epoch):
        original(self, epoch)
        if (os.path.basename(self.manager.directory) == "checkpoints"
                and self.last_saved_step == 2):
            self.manager.wait()  # the checkpoint is written in the background
            os._exit(9)  # as kill -9: nothing after the checkpoint runs

    CheckpointCallback._save = save_then_die
    cli.main(["distill", *COMMAND, f"--workdir={os.path.join(out, 'workdir')}"])


# The command of the killed run; the test resumes it with the same arguments.
COMMAND = ["--config=digits:smoke=True", "--config.epochs=2", "--config.steps_per_epoch=2",
           "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1",
           "--config.deterministic=True", "--verbose=0"]

if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "command.json"), "w") as f:
        json.dump(COMMAND, f)
    _models(out)
    _killed_workdir(out)
