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


@pytest.mark.fault(input="NaN or inf for any number (`train.beta=nan`, `.inf` in YAML)",
                   behaviour="exit 2: `train.beta: expected a finite number`")
@pytest.mark.parametrize("override, key", [("train.beta=nan", "train.beta"), ("train.learning_rate=.inf", "train.learning_rate"),
                                           ("train.max_grad_norm=-.inf", "train.max_grad_norm"),
                                           ("lora.alpha=.nan", "lora.alpha"), ("data.caption_dropout=NaN", "data.caption_dropout")])
def test_non_finite_numbers_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        load_config(None, [override])


@pytest.mark.fault(input="out-of-range numbers (`train.max_grad_norm<=0`, `train.learning_rate<=0`, `lora.alpha=0`, "
                   "`lora.dropout` outside [0, 1), `data.num_workers<0`, `train.checkpoints_total_limit<1`, ...)",
                   behaviour="exit 2 at load: names the key and its valid range")
@pytest.mark.parametrize("override, message", [
    ("train.max_grad_norm=-1", "train.max_grad_norm must be > 0, got -1.0"),  # would flip the gradient
    ("train.max_grad_norm=0", "train.max_grad_norm must be > 0, got 0.0"),  # would zero it
    ("train.learning_rate=0", "train.learning_rate must be > 0, got 0.0"),
    ("train.learning_rate=-1e-5", "train.learning_rate must be > 0, got -1e-05"),
    ("lora.alpha=0", "lora.alpha must be > 0, got 0.0"),
    ("lora.dropout=1", r"lora.dropout must be in \[0, 1\), got 1.0"),
    ("lora.dropout=-0.1", r"lora.dropout must be in \[0, 1\), got -0.1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("train.checkpoints_total_limit=0", "train.checkpoints_total_limit must be >= 1, got 0"),
    ("train.adam_beta1=1", r"train.adam_beta1 must be in \[0, 1\), got 1.0"),
    ("train.adam_beta2=-0.5", r"train.adam_beta2 must be in \[0, 1\), got -0.5"),
    ("train.adam_epsilon=-1e-8", "train.adam_epsilon must be >= 0"),
    ("train.weight_decay=-0.01", "train.weight_decay must be >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.checkpoint_every=-5", "train.checkpoint_every must be >= 0"),
    ("train.log_every=0", "train.log_every must be >= 1"),  # step % 0 would crash the first step
    ("data.max_pairs=0", "data.max_pairs must be >= 1"),
])
def test_out_of_range_values_are_rejected_at_load(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(None, [override])


def test_range_limits_themselves_are_accepted():
    cfg = load_config(None, ["train.max_grad_norm=null", "train.checkpoints_total_limit=null", "lora.dropout=0.0",
                             "lora.alpha=0.5", "data.num_workers=0", "train.checkpoints_total_limit=1",
                             "train.adam_beta1=0", "train.adam_epsilon=0", "train.checkpoint_every=0", "train.log_every=1"])
    assert cfg.train.max_grad_norm is None and cfg.train.checkpoints_total_limit == 1 and cfg.lora.alpha == 0.5


@pytest.mark.fault(input="override whose value is not valid YAML (`train.beta=[1,`)",
                   behaviour="exit 2: names the override and says how to quote")
def test_malformed_yaml_names_the_file_line_or_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 10\n\tlearning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3:1: malformed YAML \(.*'\\t' that cannot start any token\)"):
        load_config(path)
    path.write_bytes(b"train:\n  beta: 10\n# \xff\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text \(byte 0xff at offset 20\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override 'train.beta=\[1,': the value is not valid YAML"):
        load_config(None, ["train.beta=[1,"])
