"""Distill BiT-R152x2 → BiT-R50x1 on Oxford-IIIT Pets, as in the paper (Table 4).

Needs the prepared tfds dataset (`tfds build oxford_iiit_pet --data_dir=...`) and
your fine-tuned teacher (`funmatch train-teacher --config=pets37` writes one, or
a .keras / BiT .npz / timm .safetensors file). The same run from the shell:

  funmatch distill --config=pets37:variant=fast --workdir=runs/pets \
      --config.teacher=runs/pets_teacher/teacher.keras

Rerun the same command after an interruption: it resumes from the last checkpoint.
"""
import argparse

from funmatch_keras import configs
from funmatch_keras.app import distill as train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--variant", default="fast", choices=["fast", "medium", "long"])
parser.add_argument("--teacher", required=True, help=".keras file or BiT spec")
parser.add_argument("--teacher_weights", default=None, help=".npz / .safetensors")
parser.add_argument("--data_dir", default=None)
parser.add_argument("--workdir", default="runs/pets37")
parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
args = parser.parse_args()

config = configs.load_config(f"pets37:variant={args.variant},smoke={args.smoke}")
overrides = {"teacher": args.teacher, "data_dir": args.data_dir,
             "teacher_weights": args.teacher_weights}
config = configs.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
report = train.run(config, args.workdir)
print(f"student top-1 {report['student_top1']:.2%} (paper, {args.variant}: see the config)")
