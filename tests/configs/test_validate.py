"""configs.validate: non-finite floats and dataset / split settings are refused by name."""

import math
import re

import pytest

from funmatch_keras import configs
from funmatch_keras.app import cli
from funmatch_keras.configs import common

FLOAT_FIELDS = [name for name, field in common.FIELDS.items() if float in field.types]


def test_every_float_field_is_checked(smoke_config):
    # A field holding a float by default is declared a float field, so it is checked.
    defaults = configs.load_config("digits")
    holds_a_float = {name for name in common.FIELDS if type(defaults.get(name)) is float}
    assert len(holds_a_float) >= 5 and holds_a_float <= set(FLOAT_FIELDS)
    # All of them NaN at once: one error per field, naming each.
    with pytest.raises(ValueError) as error:
        configs.validate(smoke_config(**{name: "nan" for name in FLOAT_FIELDS}))
    named = re.findall(r"(\w+) must be a finite number", str(error.value))
    assert sorted(named) == sorted(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_floats_are_refused_by_name(name, text, smoke_config):
    config = smoke_config(**{name: text})
    with pytest.raises(ValueError, match=rf"{name} must be a finite number") as error:
        configs.validate(config)
    # One message for the field, not also "must be > 0".
    assert str(error.value).count("must be") == 1, str(error.value)
    assert f"--config.{name}" in str(error.value)


def test_non_finite_values_from_a_config_file_are_refused_too():
    config = configs.load_config("digits")
    config.lr = math.inf
    config.temperature = math.nan
    with pytest.raises(ValueError, match=r"(?s)temperature must be a finite.*lr must be a finite"):
        configs.validate(config)


def test_the_cli_refuses_an_infinite_lr(tmp_path, capsys):
    code = cli.main(["distill", "--config=digits:smoke=True", f"--workdir={tmp_path}",
                     "--config.lr=inf"])
    assert code == cli.EXIT_BAD_INPUT
    assert "lr must be a finite number, not inf" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


def test_any_tfds_dataset_needs_its_three_splits(smoke_config):
    config = smoke_config(dataset="cifar10")
    with pytest.raises(ValueError, match=r"dataset='cifar10' is not a preset.*set train_split, "
                                         r"validation_split, test_split"):
        configs.validate(config)
    with pytest.raises(ValueError, match=r"set validation_split, test_split, e\.g\."):
        configs.validate(smoke_config(dataset="cifar10", train_split="train[:90%]"))
    configs.validate(smoke_config(dataset="cifar10", train_split="train[:90%]",
                                  validation_split="train[90%:]", test_split="test"))


def test_presets_take_single_split_overrides_and_digits_none(smoke_config):
    configs.validate(smoke_config(dataset="pets37", test_split="test[:50%]"))
    with pytest.raises(ValueError, match=r"'digits' has fixed splits.*leave train_split None"):
        configs.validate(smoke_config(train_split="train"))
    with pytest.raises(ValueError, match="test_split must be a tfds split"):
        configs.validate(smoke_config(dataset="pets37", test_split=" "))
    with pytest.raises(ValueError, match="dataset must be one of"):
        configs.validate(smoke_config(dataset=""))


def test_split_fields_round_trip_and_older_configs_lack_them(smoke_config):
    config = smoke_config(dataset="pets37", train_split="train[:80%]")
    assert configs.from_json(configs.to_json(config)).train_split == "train[:80%]"
    assert configs.from_json('{"dataset": "pets37"}').test_split is None


def test_teacher_store_encoding_takes_the_four_forms_and_refuses_a_typo(smoke_config):
    assert configs.load_config("digits").teacher_store_encoding is None  # the store's
    for encoding in (None, "float32", "float16", "bfloat16", "top1", "top10"):
        configs.validate(smoke_config(teacher_store_encoding=encoding))
    for typo in ("flaot16", "top", "top0", "top-5", "bf16"):
        with pytest.raises(ValueError, match=rf"teacher_store_encoding: Unknown teacher store "
                                             rf"encoding '{typo}'\. Valid: 'float32'.*'float16', "
                                             r"'bfloat16', or 'top<K>'"):
            configs.validate(smoke_config(teacher_store_encoding=typo))
