import pytest

from diffusion_dpo.config import RunConfig, load_config, save_config
from diffusion_dpo.errors import ConfigError, UserError


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["train.beta=5000", "train.learning_rate=2.048e-5", "lora.rank=16",
                             "train.timestep_range=[10, 900]", "model.pretrained=some/model"])
    assert cfg.train.beta == 5000.0 and isinstance(cfg.train.beta, float)
    assert cfg.train.learning_rate == pytest.approx(2.048e-5)
    assert cfg.lora.rank == 16
    assert cfg.train.timestep_range == (10, 900)
    assert cfg.model.pretrained == "some/model"


@pytest.mark.parametrize("override, key", [("train.betaa=1", "train.betaa"), ("trian.beta=1", "trian"),
                                           ("lora.rank.x=1", "lora.rank.x")])
def test_unknown_override_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 10\n  learnin_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learnin_rate'"):
        load_config(path)


@pytest.mark.parametrize("override, fragment", [("train.batch_size=two", "train.batch_size: expected an integer"),
                                                ("train.method=ppo", "train.method: 'ppo' is not one of"),
                                                ("data.random_flip=maybe", "data.random_flip: expected true or false"),
                                                ("train.beta=-1", "train.beta must be > 0"),
                                                ("data.resolution=500", "multiple of 8")])
def test_wrong_types_and_values_are_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, UserError)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.beta=123", "lora.target_modules=[to_q, to_v]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again, RunConfig)
