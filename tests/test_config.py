"""Config loading: defaults, overrides, validation errors that name the key, LaTeX-OCR migration."""
from pathlib import Path

import pytest
import yaml

from pix2tex.config import ConfigError, DEFAULTS, load_config, to_dict


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_file_values(tmp_path):
    cfg = load_config(write(tmp_path, {"dim": 64, "optimizer": {"lr": 3e-4}}))
    assert cfg.dim == 64
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.name == DEFAULTS["optimizer"]["name"]  # untouched siblings keep defaults
    assert cfg.heads == DEFAULTS["heads"]


def test_misspelled_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, {"batchsise": 8})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "batchsise" in msg and str(path) in msg and "batchsize" in msg


def test_misspelled_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.lrr.*optimizer|'lr'"):
        load_config(write(tmp_path, {"optimizer": {"lrr": 1}}))


def test_dotted_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, {"batchsize": 4})
    cfg = load_config(path, ["batchsize=8", "optimizer.lr=3e-4", "backbone_layers=[1,1,1]",
                             "load_ckpt=null", "deterministic=true"])
    assert cfg.batchsize == 8 and cfg.optimizer.lr == 3e-4
    assert cfg.backbone_layers == [1, 1, 1] and cfg.load_ckpt is None and cfg.deterministic is True
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(path, ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["batchsize"])


def test_latex_ocr_config_migrates_with_notes(tmp_path):
    latex_ocr = {"lr": 0.001, "betas": [0.9, 0.999], "optimizer": "Adam", "scheduler": "StepLR",
                 "lr_step": 30, "gamma": 0.9995, "load_chkpt": None, "dim": 256}
    cfg = load_config(write(tmp_path, latex_ocr))
    assert cfg.optimizer.name == "Adam" and cfg.optimizer.lr == 0.001
    assert cfg.scheduler.name == "step" and cfg.scheduler.step_size == 30
    assert any("'lr' is now 'optimizer.lr'" in n for n in cfg.notes)


def test_value_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_width"):
        load_config(write(tmp_path, {"max_width": 100}))
    with pytest.raises(ConfigError, match="micro_batchsize"):
        load_config(write(tmp_path, {"batchsize": 10, "micro_batchsize": 3}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="resnet_channels must be three positive integers"):
        load_config(write(tmp_path, {"resnet_channels": [32, 64]}))


def test_to_dict_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"dim": 32}))
    plain = to_dict(cfg)
    assert type(plain["optimizer"]) is dict and plain["dim"] == 32
    again = load_config(write(tmp_path, plain, "again.yaml"))
    assert to_dict(again) == plain


def test_yaml_exponent_floats_and_type_errors(tmp_path):
    # PyYAML reads `3e-4` as a string; a user writing it in a file must still get a float.
    path = tmp_path / "e.yaml"
    path.write_text("optimizer:\n  lr: 3e-4\n")
    assert load_config(path).optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="'batchsize' must be a number"):
        load_config(write(tmp_path, {"batchsize": "many"}))
    with pytest.raises(ConfigError, match="'deterministic' must be true or false"):
        load_config(write(tmp_path, {"deterministic": "yes please"}))


LATEX_OCR = Path(__file__).resolve().parent / "fixtures" / "latex_ocr"  # its shipped configs


def test_latex_ocr_shipped_configs_load_and_each_key_keeps_its_meaning():
    cfg = load_config(LATEX_OCR / "config.yaml")
    assert cfg.optimizer.name == "Adam" and cfg.optimizer.lr == 0.001
    assert cfg.scheduler.name == "step" and cfg.scheduler.step_size == 30
    assert cfg.save_freq == 5 and cfg.save_steps == 0  # every 5th epoch, as there
    assert cfg.temperature == 0.2  # validation samples at 0.2, as there
    assert cfg.pad is False and cfg.gpu_devices is None
    # LaTeX-OCR logged to wandb unless debug: true; it had no wandb key
    assert cfg.wandb is True and any("wandb on, as in LaTeX-OCR" in n for n in cfg.notes)
    debug = load_config(LATEX_OCR / "debug.yaml")
    assert debug.debug is True and debug.wandb is False
    assert debug.max_width == 128 and debug.patch_size == 32 and debug.decoder_args.use_scalenorm
    # an explicit wandb key wins; --debug (train.py) passes debug=true wandb=false
    assert load_config(LATEX_OCR / "config.yaml", ["wandb=false"]).wandb is False
    assert load_config(LATEX_OCR / "config.yaml", ["debug=true"]).wandb is False


def test_our_configs_do_not_change_meaning(tmp_path):
    cfg = load_config(write(tmp_path, {"dim": 64}))
    assert cfg.wandb is False and cfg.temperature == 0.0 and not cfg.notes


def test_latex_ocr_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="gpu_devices must be null or a list"):
        load_config(write(tmp_path, {"gpu_devices": "0,1"}))
    with pytest.raises(ConfigError, match="gpu_devices"):
        load_config(write(tmp_path, {"gpu_devices": [-1]}))
    assert load_config(write(tmp_path, {"gpu_devices": [1]})).gpu_devices == [1]
    with pytest.raises(ConfigError, match="val_beam_width"):
        load_config(write(tmp_path, {"temperature": 0.2, "val_beam_width": 3}))
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        load_config(write(tmp_path, {"temperature": -1}))
    with pytest.raises(ConfigError, match="save_freq must be >= 0"):
        load_config(write(tmp_path, {"save_freq": -5}))


def test_selection_metrics_are_checked_on_load(tmp_path):
    with pytest.raises(ConfigError, match="best_metric must be one of bleu"):
        load_config(write(tmp_path, {"best_metric": "blue"}))
    with pytest.raises(ConfigError, match="early_stopping.monitor must be one of"):
        load_config(write(tmp_path, {"early_stopping": {"patience": 2, "monitor": "loss"}}))
    assert load_config(write(tmp_path, {"best_metric": "val_loss"})).best_metric == "val_loss"


def test_extends_starts_from_another_file_and_merges_nested_keys(tmp_path):
    write(tmp_path, {"dim": 64, "heads": 4, "optimizer": {"name": "AdamW", "lr": 1e-3}}, "base.yaml")
    (tmp_path / "exp").mkdir()
    child = write(tmp_path / "exp", {"extends": "../base.yaml", "heads": 2, "optimizer": {"lr": 5e-4}})
    cfg = load_config(child)
    assert (cfg.dim, cfg.heads) == (64, 2)  # kept from the base, overridden here
    assert cfg.optimizer.name == "AdamW" and cfg.optimizer.lr == 5e-4  # merged key by key
    # a bad key in the base is named with the file chain it came through
    write(tmp_path, {"dimm": 64}, "base.yaml")
    with pytest.raises(ConfigError, match=r"exp/c\.yaml extending .*base\.yaml.*'dimm'"):
        load_config(child)
    write(tmp_path, {"extends": "exp/c.yaml"}, "base.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(child)
    with pytest.raises(ConfigError, match="not found: .*nothing.yaml"):
        load_config(write(tmp_path, {"extends": "nothing.yaml"}))
    # `extends` given to load_config replaces the file's own: the same experiment, another base
    write(tmp_path, {"dim": 64, "heads": 4, "optimizer": {"name": "AdamW", "lr": 1e-3}}, "base.yaml")
    other = write(tmp_path, {"dim": 128, "optimizer": {"name": "SGD"}}, "other.yaml")
    cfg = load_config(child, extends=other)
    assert (cfg.dim, cfg.heads) == (128, 2) and (cfg.optimizer.name, cfg.optimizer.lr) == ("SGD", 5e-4)


def test_distillation_experiments_extend_one_student():
    settings = Path(__file__).resolve().parent.parent / "settings" / "distill"
    student = to_dict(load_config(settings / "student.yaml"))
    for name in ("original", "target_soft", "target_soft_embed", "beamsearch", "bs_soft",
                 "bs_soft_embed"):
        text = (settings / f"{name}.yaml").read_text()
        assert "extends: student.yaml" in text and "encoder_structure" not in text, name
        cfg = to_dict(load_config(settings / f"{name}.yaml"))
        assert cfg["name"] == f"distill-{name}"
        assert {k: v for k, v in cfg.items() if k not in ("name", "distill")} == \
            {k: v for k, v in student.items() if k not in ("name", "distill")}
