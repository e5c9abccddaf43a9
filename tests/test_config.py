"""Config loading, overrides and validation."""

import pytest

from kdjax import config as config_lib

FINETUNE = "configs/finetune.py"


def _load(*overrides, spec=FINETUNE):
    return config_lib.validate(config_lib.apply_overrides(config_lib.load_config(spec),
                                                          list(overrides)))


def test_defaults_and_quick_variant():
    default, quick = _load(), _load(spec=FINETUNE + ":quick")
    assert default.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert default.data.task == "sst2" and default.data.train_limit == 0
    assert quick.data.train_limit == 4000


def test_overrides_are_typed():
    config = _load("--config.optim.lr=3e-5", "--config.data.buckets=(16,64)",
                   "--config.train.epochs=2", "--config.data.text_columns=q1,q2",
                   "--config.model.name=some/model")
    assert config.optim.lr == 3e-5
    assert config.data.buckets == (16, 64)
    assert config.train.epochs == 2.0 and isinstance(config.train.epochs, float)
    assert config.data.text_columns == ("q1", "q2")
    assert config.model.name == "some/model"


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("--config.nothing.lr=1", "unknown config key 'nothing'"),
    ("--config.optim.lr=fast", "config key 'optim.lr' expects float"),
    ("--config.optim=1", "config key 'optim' is a section"),
    ("--config.optim.lr=-1e-4", "config key 'optim.lr' must be > 0"),
    ("--config.data.max_length=1024", "config key 'data.max_length' must be 0 for auto, or in"),
    ("--config.train.epochs=0", "config key 'train.epochs' must be > 0"),
    ("--config.model.dtype=float16", "config key 'model.dtype' must be"),
    ("--config.data.buckets=(16,32)", "config key 'data.buckets' must reach data.max_length"),
    ("--config.data.text_columns=(a,b,c)", "config key 'data.text_columns' must name 1 or 2"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        _load(override)


def test_unknown_variant_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'slow'"):
        config_lib.load_config(FINETUNE + ":slow")
    with pytest.raises(config_lib.ConfigError, match="config file nowhere.py not found"):
        config_lib.load_config("nowhere.py")
