"""Tests for funmatch_keras.configs: shipped configs, Table 4, overrides, storage."""

import json

import pytest

from funmatch_keras import configs
from funmatch_keras.configs import common

# Paper Table 4 (Beyer et al., CVPR 2022), written out independently of the configs:
# dataset -> variant -> (epochs, temperature, lr, weight decay).
TABLE_4 = {
    "flowers102": {
        "fast": (10_000, 10.0, 3e-3, 3e-4),
        "medium": (100_000, 1.0, 1e-3, 1e-4),
        "long": (1_000_000, 1.0, 3e-4, 1e-5),
    },
    "pets37": {
        "fast": (1_000, 5.0, 1e-2, 1e-3),
        "medium": (3_000, 10.0, 3e-3, 3e-4),
        "long": (30_000, 2.0, 3e-3, 1e-5),
    },
    "food101": {
        "fast": (100, 10.0, 1e-2, 1e-3),
        "medium": (1_000, 10.0, 1e-3, 3e-4),
        "long": (3_000, 5.0, 1e-2, 1e-4),
    },
    "sun397": {
        "fast": (100, 10.0, 1e-2, 1e-3),
        "medium": (1_000, 10.0, 1e-3, 1e-4),
        "long": (3_000, 10.0, 1e-2, 3e-5),
    },
}

ALL_SPECS = (
    ["digits", "digits:variant=demo", "imagenet", "imagenet:teacher_res=384",
     "imagenet:ensemble=True"]
    + [f"{name}:variant={v}" for name, table in TABLE_4.items() for v in table]
)


def test_list_configs():
    assert configs.list_configs() == [
        "digits", "flowers102", "food101", "imagenet", "pets37", "sun397"
    ]


def test_every_config_mode_builds_a_data_pipeline():
    import numpy as np

    from funmatch_keras.data import pipelines as data
    from funmatch_keras.data import sources

    src = sources.array_source(np.zeros([4, 8, 8, 3], np.uint8), np.arange(4) % 2)
    for mode in common.MODES:
        logits = np.zeros([4, 2], np.float32) if mode == "fixed_teacher" else None
        batch = next(iter(data.train_pipeline(src, mode=mode, batch_size=2, student_size=8,
                                              seed=0, teacher_logits=logits)))
        assert batch is not None, mode


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("smoke", [False, True])
def test_every_config_parses_and_validates(spec, smoke):
    if smoke:
        spec += ("," if ":" in spec else ":") + "smoke=True"
    config = configs.load_config(spec)
    configs.validate(config)
    assert set(config) == set(common.FIELDS)
    if smoke:
        assert config.steps_per_epoch <= 2 and config.epochs <= 2
        assert str(config.student).startswith("cnn:")
        assert config.batch_size <= 16


@pytest.mark.parametrize(
    "dataset,variant", [(d, v) for d, table in TABLE_4.items() for v in table]
)
def test_table_4_numbers_are_exact(dataset, variant):
    config = configs.load_config(f"{dataset}:variant={variant}")
    epochs, temperature, lr, wd = TABLE_4[dataset][variant]
    assert (config.epochs, config.temperature, config.lr, config.weight_decay) == (
        epochs, temperature, lr, wd
    )
    assert config.dataset == dataset
    assert (config.teacher, config.student, config.student_size) == (
        "bit_r152x2", "bit_r50x1", 128
    )
    assert config.teacher_weights is None and config.teacher_size is None
    assert (config.batch_size, config.warmup_steps, config.mode) == (
        512, 1500, "function_matching"
    )


def test_default_variant_is_medium():
    assert configs.load_config("pets37").epochs == 3_000


def test_imagenet():
    config = configs.load_config("imagenet")
    assert (config.lr, config.weight_decay, config.temperature) == (0.03, 3e-4, 1.0)
    assert (config.warmup_steps, config.student_size, config.batch_size) == (5000, 224, 4096)
    assert (config.epochs, config.teacher_size, config.dataset) == (1200, None, "imagenet2012")
    assert configs.load_config("imagenet:teacher_res=384").teacher_size == 384
    ensemble = configs.load_config("imagenet:ensemble=True,epochs=9600")
    assert ensemble.teacher == ["bit_r152x2", "bit_r152x2"]
    assert ensemble.teacher_size == [224, 384]
    assert ensemble.epochs == 9600
    with pytest.raises(ValueError, match="teacher_res"):
        configs.load_config("imagenet:ensemble=True,teacher_res=384")


def test_smoke_keeps_cross_resolution():
    config = configs.load_config("imagenet:teacher_res=384,smoke=True")
    assert config.teacher_size > config.student_size
    ensemble = configs.load_config("imagenet:ensemble=True,smoke=True")
    assert len(ensemble.teacher) == 2 and ensemble.teacher_size[1] > ensemble.teacher_size[0]


def test_digits():
    config = configs.load_config("digits")
    assert (config.teacher, config.student) == ("cnn:32,64,128", "cnn:16,32,64")
    assert (config.student_size, config.batch_size, config.epochs) == (16, 64, 60)
    assert (config.lr, config.weight_decay, config.temperature) == (1e-2, 1e-5, 1.0)
    assert (config.teacher_epochs, config.crop_area_min, config.flip) == (20, 0.25, False)
    assert config.mode == "function_matching"


def test_base_defaults():
    config = common.base_config()
    assert config.batch_size == 512 and config.warmup_steps == 1500
    assert config.checkpoint_every_steps == 1000 and config.keep_checkpoints == 3
    assert config.crop_area_min == 0.05 and config.flip is True
    assert config.student_weights is None and config.num_classes is None


def test_configs_are_locked_against_typos():
    config = configs.load_config("digits")
    with pytest.raises(AttributeError):
        config.epoch = 3


def test_unknown_config_name_lists_available():
    with pytest.raises(ValueError, match="pets37") as info:
        configs.load_config("petz")
    assert "digits" in str(info.value)


@pytest.mark.parametrize(
    "arg,match",
    [("varient=fast", "Valid arguments"), ("variant=huge", "fast"), ("smoke=maybe", "bool")],
)
def test_bad_config_arguments(arg, match):
    with pytest.raises(ValueError, match=match):
        configs.load_config(f"pets37:{arg}")


def test_overrides_convert_types():
    config = configs.load_config("pets37:variant=fast")
    new = configs.apply_overrides(
        config,
        {
            "epochs": "10",
            "lr": "0.5",
            "temperature": "2",
            "flip": "false",
            "student": "keras:MobileNetV2",
            "steps_per_epoch": "5",
            "teacher_weights": "/tmp/teacher.npz",
            "data_dir": "2024",
            "teacher_size": "224",
        },
    )
    assert new.epochs == 10 and new.lr == 0.5 and new.temperature == 2.0
    assert isinstance(new.temperature, float)
    assert new.flip is False and new.student == "keras:MobileNetV2"
    assert new.steps_per_epoch == 5 and new.teacher_weights == "/tmp/teacher.npz"
    assert new.data_dir == "2024" and new.teacher_size == 224
    assert config.epochs == 1_000  # the input is left unchanged
    back = configs.apply_overrides(new, {"steps_per_epoch": "None", "teacher_weights": "none"})
    assert back.steps_per_epoch is None and back.teacher_weights is None
    assert configs.apply_overrides(config, {"epochs": "1e6"}).epochs == 1_000_000


def test_overrides_make_an_ensemble():
    config = configs.apply_overrides(
        configs.load_config("imagenet"),
        {"teacher": "['bit_r152x2', 'bit_r101x3']", "teacher_size": "[224, 384]"},
    )
    assert config.teacher == ["bit_r152x2", "bit_r101x3"]
    assert config.teacher_size == [224, 384]
    configs.validate(config)


def test_unknown_override_suggests_close_match():
    with pytest.raises(ValueError) as info:
        configs.apply_overrides(configs.load_config("digits"), {"epoch": "3"})
    message = str(info.value)
    assert "'epoch'" in message and "Did you mean 'epochs'" in message
    assert "Valid fields:" in message and "batch_size" in message and "temperature" in message


def test_nested_overrides(tmp_path):
    path = tmp_path / "nested.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'model': {'width': 2, 'name': 'x'}})\n"
    )
    config = configs.load_config(str(path))
    assert configs.apply_overrides(config, {"model.width": "8"}).model.width == 8
    with pytest.raises(ValueError, match="model.width"):
        configs.apply_overrides(config, {"model.widht": "8"})
    with pytest.raises(ValueError, match="group of fields"):
        configs.apply_overrides(config, {"model": "3"})


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("epochs", "ten", "int"),
        ("epochs", "3.5", "int"),
        ("lr", "fast", "float"),
        ("flip", "maybe", "bool"),
        ("steps_per_epoch", "abc", "int or None"),
        ("batch_size", "None", "int"),
    ],
)
def test_bad_override_type_names_field_and_type(field, value, expected):
    with pytest.raises(ValueError, match=f"'{field}' expects {expected}"):
        configs.apply_overrides(configs.load_config("pets37"), {field: value})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"mode": "magic"}, "mode must be one of"),
        ({"temperature": "0"}, "temperature must be > 0"),
        ({"lr": "-1"}, "lr must be > 0"),
        ({"batch_size": "0"}, "batch_size must be a positive int"),
        ({"epochs": "-3"}, "epochs must be a positive int"),
        ({"student_size": "0"}, "student_size must be a positive int"),
        ({"steps_per_epoch": "0"}, "steps_per_epoch must be a positive int or None"),
        ({"dataset": "mnist"}, "dataset='mnist' is not a preset.*set train_split"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"crop_area_min": "0"}, "crop_area_min must be in"),
        ({"teacher_size": "[224, 384]"}, "one entry per teacher"),
    ],
)
def test_validate_rejects_bad_values(overrides, match):
    config = configs.apply_overrides(configs.load_config("pets37"), overrides)
    with pytest.raises(ValueError, match=match):
        configs.validate(config)


def test_validate_lists_every_problem():
    config = configs.apply_overrides(
        configs.load_config("pets37"), {"temperature": "0", "lr": "0"}
    )
    with pytest.raises(ValueError, match="(?s)temperature.*lr"):
        configs.validate(config)


def test_path_based_config(tmp_path):
    path = tmp_path / "my_pets.py"
    path.write_text(
        '"""A user config: Pets with a ResNet50V2 teacher file."""\n'
        "from funmatch_keras.configs import common\n"
        "def get_config(arg=None):\n"
        "    opts = common.parse_arg(arg, epochs=5)\n"
        "    return common.base_config(dataset='pets37', teacher='/m/teacher.keras',\n"
        "                              epochs=opts.epochs)\n"
    )
    config = configs.load_config(f"{path}:epochs=7")
    configs.validate(config)
    assert config.teacher == "/m/teacher.keras" and config.epochs == 7
    assert configs.load_config(str(path)).epochs == 5
    with pytest.raises(FileNotFoundError):
        configs.load_config(str(tmp_path / "missing.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        configs.load_config(str(empty))


@pytest.mark.parametrize("spec", ["pets37:variant=long", "imagenet:ensemble=True", "digits"])
def test_json_round_trip(spec):
    config = configs.load_config(spec)
    text = configs.to_json(config)
    back = configs.from_json(text)
    assert back.to_dict() == config.to_dict()
    assert configs.to_json(back) == text
    configs.validate(back)
    assert configs.diff(config, back) == {}
    changed = configs.apply_overrides(back, {"epochs": "3"})
    assert configs.diff(back, changed) == {"epochs": (back.epochs, 3)}
    assert configs.to_json(changed) != text


def test_cadence_is_in_steps_and_lands_evals_and_checkpoints_on_log_steps():
    config = configs.load_config("pets37:variant=fast")  # 1000 epochs
    assert configs.cadence(config, 6) == (6000, 50, 300, 1000)
    # Flowers102: 2-step epochs for 10,000 epochs; nothing tied to epoch ends.
    flowers = configs.apply_overrides(config, {"epochs": "10000"})
    assert configs.cadence(flowers, 2) == (20000, 50, 1000, 1000)
    # A short run logs about 10 times; evals and checkpoints round up to log steps.
    short = configs.apply_overrides(config, {"epochs": "3", "checkpoint_every_steps": "7"})
    assert configs.cadence(short, 6) == (18, 1, 1, 7)
    every = configs.apply_overrides(config, {"eval_every_epochs": "7", "log_every_steps": "4"})
    assert configs.cadence(every, 6).eval_every_steps == 44  # 42 rounded up to a log step
    steps = configs.apply_overrides(every, {"eval_every_steps": "8"})
    assert configs.cadence(steps, 6).eval_every_steps == 8
    # A teacher's own schedule.
    assert configs.cadence(config, 6, epochs=2).total_steps == 12
    # With steps_per_execution, the default log interval is a multiple of it.
    tpu = configs.apply_overrides(config, {"steps_per_execution": "8", "epochs": "4"})
    assert configs.cadence(tpu, 6).log_every_steps == 8


def test_log_every_steps_must_be_a_multiple_of_steps_per_execution():
    config = configs.apply_overrides(configs.load_config("digits"),
                                     {"steps_per_execution": "4", "log_every_steps": "6"})
    with pytest.raises(ValueError, match="log_every_steps must be None or a positive multiple "
                                         r"of steps_per_execution \(4\)"):
        configs.validate(config)
    configs.validate(configs.apply_overrides(config, {"log_every_steps": "8"}))


# -- teachers as a list of sub-configs ------------------------------------------


def test_teachers_list_and_shorthand_name_the_same_teachers():
    shorthand = configs.load_config("imagenet:ensemble=True")
    listed = configs.apply_overrides(shorthand, {
        "teachers": "[{'model': 'bit_r152x2', 'size': 224}, "
                    "{'model': 'bit_r152x2', 'size': 384, 'weights': None}]",
        "teacher": "bit_r152x2", "teacher_size": "None"})
    configs.validate(listed)
    expected = [configs.TeacherSpec("bit_r152x2", None, 224),
                configs.TeacherSpec("bit_r152x2", None, 384)]
    assert configs.teacher_specs(shorthand) == configs.teacher_specs(listed) == expected
    assert configs.teacher_sizes(listed) == [224, 384]
    # A workdir written with one form accepts the other.
    assert configs.diff(shorthand, listed) == {}
    assert "teachers" in configs.diff(shorthand, configs.apply_overrides(
        listed, {"teachers": "[{'model': 'bit_r50x1'}]"}))


def test_one_teacher_shorthand_defaults_its_size_to_the_student():
    config = configs.load_config("pets37")
    assert configs.teacher_specs(config) == [configs.TeacherSpec("bit_r152x2", None, 128)]
    config = configs.apply_overrides(config, {"teacher_weights": "/w.npz",
                                              "teacher_size": "224"})
    assert configs.teacher_specs(config) == [configs.TeacherSpec("bit_r152x2", "/w.npz", 224)]
    assert configs.teacher_sizes(config) == 224


@pytest.mark.parametrize("teachers,message", [
    ("[]", "non-empty list"),
    ("['bit_r50x1']", "must hold dicts"),
    ("[{'modle': 'bit_r50x1'}]", "unknown keys \\['modle'\\]"),
    ("[{'model': 'bit_r50x1', 'size': 0}]", "'size' must be a positive int"),
    ("[{'model': 'bit_r50x1', 'weights': 3}]", "'weights' must be a path"),
])
def test_bad_teachers_lists_are_clear_errors(teachers, message):
    config = configs.apply_overrides(configs.load_config("digits"), {"teachers": teachers})
    with pytest.raises(ValueError, match=message):
        configs.validate(config)


def test_teachers_list_refuses_shorthand_weights_beside_it():
    config = configs.apply_overrides(configs.load_config("digits"), {
        "teachers": "[{'model': 'cnn:8'}]", "teacher_weights": "/w.npz"})
    with pytest.raises(ValueError, match="teacher_weights must be None when `teachers`"):
        configs.validate(config)


def test_smoke_shrinks_a_teachers_list():
    config = configs.apply_overrides(configs.load_config("imagenet"), {
        "teachers": "[{'model': 'bit_r152x2', 'size': 224}, {'model': 'bit_r152x2', "
                    "'size': 384}]"})
    from funmatch_keras.configs.common import SMOKE_TEACHER, shrink_for_smoke
    small = shrink_for_smoke(config)
    specs = configs.teacher_specs(small)
    assert [s.model for s in specs] == [SMOKE_TEACHER] * 2
    assert specs[0].size < specs[1].size


def test_config_json_of_an_older_version_gets_new_fields_as_defaults():
    current = configs.load_config("digits")
    old = json.loads(configs.to_json(current))
    del old["teachers"]  # a config.json written before `teachers` existed
    restored = configs.from_json(json.dumps(old))
    configs.validate(restored)
    assert restored.teachers is None and configs.diff(restored, current) == {}
