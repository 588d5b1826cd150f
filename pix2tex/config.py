"""Configs are data: a YAML file, dotted `key=value` overrides, validated against DEFAULTS.

Every key a config may hold is in DEFAULTS below (with its default). An unknown or misspelled key
is an error that names the key, the file and the closest valid key. LaTeX-OCR's flat optimizer
keys (`lr`, `betas`, `optimizer: Adam`, `scheduler: StepLR`, `lr_step`, `gamma`, `load_chkpt`) are
moved into their new places, and each move is reported in `Config.notes` for the entry point to
print. Every other key of LaTeX-OCR's configs means what it meant there: `save_freq` counts
epochs, `temperature` is the validation's sampling temperature, `pad` pads images to the largest
size, `debug` without a `wandb` key logs to wandb unless it is true (as LaTeX-OCR did),
`gpu_devices` picks the GPU(s).
"""
from __future__ import annotations

import ast
import copy
import difflib
import os
from typing import Any

import yaml
from munch import Munch, unmunchify

DEFAULTS: dict[str, Any] = {
    # --- data -----------------------------------------------------------------------------
    "data": None,  # train pkl
    "valdata": None,  # validation pkl
    "testdata": None,  # test pkl (eval.py)
    "tokenizer": None,  # tokenizer.json
    "num_workers": 0,  # DataLoader workers that load image batches
    # --- images ---------------------------------------------------------------------------
    "channels": 1,
    "min_height": 32,
    "min_width": 32,
    "max_height": 192,
    "max_width": 672,
    "patch_size": 16,
    "pad": False,  # pad every training/validation image to max_width x max_height (white)
    # --- model ----------------------------------------------------------------------------
    "encoder_structure": "hybrid",  # hybrid | vit | resnet
    "backbone_layers": [2, 3, 7],  # ResNetV2 stage depths of the hybrid encoder
    # the resnet encoder's three stages (stride 16): blocks and channels per stage (the default
    # is ResNet-18's; a student narrows them)
    "resnet_layers": [2, 2, 2],
    "resnet_channels": [64, 128, 256],
    "dim": 256,  # model width (encoder and decoder)
    "encoder_depth": 4,  # transformer blocks of the encoder
    "encoder_heads": None,  # None: same as `heads`
    "num_layers": 4,  # decoder depth
    "heads": 8,  # decoder attention heads
    "max_seq_len": 512,  # longest token sequence, BOS and EOS included
    "num_tokens": 8000,  # vocabulary size of the model (>= the tokenizer's)
    "pad_token": 0,
    "bos_token": 1,
    "eos_token": 2,
    "emb_dropout": 0.0,
    # biases in the decoder's layer norms, attention outputs and logits, as LaTeX-OCR's decoder
    # (x-transformers 0.15) had; loading a LaTeX-OCR weights file sets it
    "decoder_bias": False,
    "decoder_args": {"attn_on_attn": True, "cross_attend": True, "ff_glu": True,
                     "rel_pos_bias": False, "use_scalenorm": False},
    # --- training -------------------------------------------------------------------------
    "seed": 42,
    "deterministic": False,  # bit-exact runs on CPU (and resume that reproduces them)
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    "compile": False,  # torch.compile the model
    "inference_precision": "auto",  # generate(): auto | fp32 | bf16 | int8 (models/model.py resolve_precision)
    # validation, eval.py and pseudo-labels decode in this precision: fp32 by default, so scores,
    # best.pth and a teacher's labels do not depend on the CPU (auto is int8 on AMX CPUs)
    "eval_precision": "fp32",
    "epochs": 10,
    "max_steps": 0,  # stop after this many optimizer steps (0: no limit)
    "batchsize": 10,  # samples per optimizer step (global, over all DDP ranks)
    "micro_batchsize": -1,  # samples per forward/backward (-1: = batchsize); accumulates gradients
    "testbatchsize": 20,
    "optimizer": {"name": "AdamW", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0,
                  "eps": 1e-8, "momentum": 0.9},
    "scheduler": {"name": "none",  # none | onecycle | cosine | step | multistep
                  "warmup_steps": 0, "pct_start": 0.3, "step_size": 30, "gamma": 0.9995,
                  "milestones": [], "min_lr": 0.0,
                  "total_steps": 0,  # schedule length (0: max_steps, else all epochs)
                  # cosine only: restart every cycle_steps (warm restarts; 0: one cosine), each
                  # cycle's peak LR cycle_decay times the one before
                  "cycle_steps": 0, "cycle_decay": 1.0},
    "grad_clip": 1.0,  # max gradient norm (0: no clipping)
    "sample_freq": 1000,  # validate every this many steps (and at each epoch end and max_steps)
    "save_freq": 0,  # keep the checkpoint of every n-th epoch's end, <name>_eNN.pth (0: none)
    "save_steps": 0,  # also save `last.pth` every this many steps (0: at validations only)
    "log_freq": 10,  # append training loss/LR to metrics.jsonl every this many steps
    "valbatches": 100,  # validation batches that get generation metrics
    "val_beam_width": 1,
    "test_samples": 5,  # examples printed/logged at each validation
    "temperature": 0.0,  # validation decoding: 0 greedy, > 0 sampling at this temperature (seeded)
    "best_metric": "bleu",  # best.pth by this validation metric (VALIDATION_METRICS)
    "early_stopping": {"patience": 0, "monitor": None, "min_delta": 0.0},  # patience 0: off
    "fast_dev_run": False,  # a couple of train and val batches end to end, then stop
    "debug": False,  # LaTeX-OCR's: given without `wandb`, wandb = not debug (_debug_means_wandb)
    # --- output ---------------------------------------------------------------------------
    "name": "pix2tex",
    "model_path": "checkpoints",  # runs go to model_path/name
    "output_path": "outputs",
    "load_ckpt": None,  # checkpoint to start from / resume
    "wandb": False,
    "id": None,  # wandb run id
    "gpu_devices": None,  # CUDA device indices: [i] trains on cuda:i; under torchrun rank r
    # takes the r-th (one process per GPU replaces LaTeX-OCR's DataParallel); null: cuda:0 / LOCAL_RANK
    # --- distillation (distill.py) --------------------------------------------------------
    "distill": {
        "teacher_config": None,
        "teacher_ckpt": None,
        "temperature": 4.0,  # softmax temperature of the soft-target loss
        "r_target": 1.0,  # cross-entropy on the labels
        "r_soft": 0.0,  # KL(teacher || student) * T^2
        "r_hard": 0.0,  # cross-entropy on the teacher's argmax tokens
        "r_embedding": 0.0,  # distance of hidden representations
        "embedding_loss": "mse",  # mse | cosine
        "embed_decoder": False,  # also match decoder hidden states (not only encoder output)
        "pseudo_labels": None,  # dataset pkl of teacher beam outputs to train on (sequence KD)
        "beam_width": 5,
        # start the student from the teacher's weights (weight selection: the first n channels,
        # dims and heads of each tensor; pix2tex.distill.weight_selection) instead of at random
        "init_from_teacher": False,
    },
}

# What a validation reports, so what `best_metric` and `early_stopping.monitor` may name.
VALIDATION_METRICS = ("bleu", "edit_distance", "token_edit_accuracy", "token_accuracy",
                      "exact_match", "val_loss")

# LaTeX-OCR's flat keys and where they live now.
RENAMED = {"lr": "optimizer.lr", "betas": "optimizer.betas", "lr_step": "scheduler.step_size",
           "gamma": "scheduler.gamma", "load_chkpt": "load_ckpt"}
SCHEDULER_NAMES = {"steplr": "step", "onecyclelr": "onecycle", "cosineannealinglr": "cosine",
                   "multisteplr": "multistep"}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and what to do."""


class Config(Munch):
    """A Munch with attribute access; `notes` lists what was migrated from LaTeX-OCR keys."""


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _migrate(raw: dict, notes: list[str]) -> dict:
    """Move LaTeX-OCR flat keys to their nested places; record each move."""
    raw = dict(raw)
    if isinstance(raw.get("optimizer"), str):
        notes.append(f"'optimizer: {raw['optimizer']}' is now 'optimizer.name'")
        raw["optimizer"] = {"name": raw["optimizer"]}
    if isinstance(raw.get("scheduler"), str):
        name = SCHEDULER_NAMES.get(raw["scheduler"].lower(), raw["scheduler"].lower())
        notes.append(f"'scheduler: {raw['scheduler']}' is now 'scheduler.name: {name}'")
        raw["scheduler"] = {"name": name}
    for old, new in RENAMED.items():
        if old in raw:
            value = raw.pop(old)
            group, _, leaf = new.partition(".")
            if leaf:
                raw.setdefault(group, {})
                if not isinstance(raw[group], dict):
                    raw[group] = {}
                raw[group].setdefault(leaf, value)
            else:
                raw.setdefault(group, value)
            notes.append(f"'{old}' is now '{new}'")
    return raw


def _debug_means_wandb(raw: dict, notes: list[str]) -> dict:
    """LaTeX-OCR had no wandb key: it logged to wandb unless `debug` was true. The same here when
    a config (file and overrides together) sets `debug` but not `wandb`."""
    if isinstance(raw.get("debug"), bool) and "wandb" not in raw:
        raw = {**raw, "wandb": not raw["debug"]}
        notes.append(f"'debug: {str(raw['debug']).lower()}' without a 'wandb' key: wandb "
                     f"{'on' if raw['wandb'] else 'off'}, as in LaTeX-OCR (set 'wandb' to choose)")
    return raw


def _merge(defaults: dict, given: dict, where: str, prefix: str = "") -> dict:
    """Defaults overlaid with `given`; unknown keys raise naming `where` and the closest key."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        full = prefix + str(key)
        if key not in defaults:
            raise ConfigError(f"{where}: unknown config key '{full}'.{_closest(key, defaults)}")
        if isinstance(defaults[key], dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' must be a mapping of "
                                  f"{', '.join(defaults[key])}, got {value!r}")
            # decoder_args is passed through to x-transformers: any key is allowed there.
            if full == "decoder_args":
                out[key] = {**defaults[key], **value}
            else:
                out[key] = _merge(defaults[key], value, where, full + ".")
        else:
            out[key] = _typed(defaults[key], value, f"{where}: '{full}'")
    return out


def _typed(default: Any, value: Any, where: str) -> Any:
    """`value` checked against the default's type. PyYAML reads `3e-4` as a string (YAML 1.1
    wants `3.0e-4`), so numeric strings become numbers where the default is a number."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value) if isinstance(default, float) else int(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(default, float):
            value = float(value)
    elif isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list like {default!r}, got {value!r}")
    return value


def parse_value(text: str) -> Any:
    """An override value as YAML would read it (`3e-4`, `true`, `[2,3,7]`, `null`, `abc`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (validated later with the rest)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value "
                              f"(e.g. batchsize=8 or optimizer.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parse_value(value)
    return raw


def _check(cfg: dict, where: str) -> None:
    """Value checks that are cheap and catch the usual mistakes before any work starts."""
    if cfg["encoder_structure"] not in ("hybrid", "vit", "resnet"):
        raise ConfigError(f"{where}: encoder_structure must be hybrid, vit or resnet, "
                          f"got {cfg['encoder_structure']!r}")
    for key in ("resnet_layers", "resnet_channels"):
        value = cfg[key]
        if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                      for v in value):
            raise ConfigError(f"{where}: {key} must be three positive integers (one per stage of "
                              f"the resnet encoder), got {value!r}")
    for side in ("max_height", "max_width"):
        if cfg[side] % cfg["patch_size"]:
            raise ConfigError(f"{where}: {side}={cfg[side]} must be a multiple of "
                              f"patch_size={cfg['patch_size']}")
    if cfg["precision"] not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"{where}: precision must be auto, fp32 or bf16, got {cfg['precision']!r}")
    sched = cfg["scheduler"]["name"]
    if sched not in ("none", "onecycle", "cosine", "step", "multistep"):
        raise ConfigError(f"{where}: scheduler.name must be none, onecycle, cosine, step or "
                          f"multistep, got {sched!r}")
    if cfg["eval_precision"] not in ("auto", "fp32", "bf16", "int8"):
        raise ConfigError(f"{where}: eval_precision must be fp32, bf16, int8 or auto, "
                          f"got {cfg['eval_precision']!r}")
    if cfg["scheduler"]["cycle_steps"] < 0 or cfg["scheduler"]["cycle_decay"] <= 0:
        raise ConfigError(f"{where}: scheduler.cycle_steps must be >= 0 and scheduler.cycle_decay "
                          f"> 0, got {cfg['scheduler']['cycle_steps']} and "
                          f"{cfg['scheduler']['cycle_decay']}")
    if cfg["scheduler"]["cycle_steps"] and sched != "cosine":
        raise ConfigError(f"{where}: scheduler.cycle_steps (warm restarts) needs scheduler.name: "
                          f"cosine, got {sched!r}")
    for key, value in (("best_metric", cfg["best_metric"]),
                       ("early_stopping.monitor", cfg["early_stopping"]["monitor"])):
        if value is not None and value not in VALIDATION_METRICS:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(VALIDATION_METRICS)}, "
                              f"got {value!r}")
    if cfg["temperature"] < 0 or (cfg["temperature"] > 0 and cfg["val_beam_width"] > 1):
        raise ConfigError(f"{where}: temperature must be >= 0 (0: greedy) and sampling "
                          f"(temperature > 0) needs val_beam_width: 1, got temperature "
                          f"{cfg['temperature']} and val_beam_width {cfg['val_beam_width']}")
    for key in ("save_freq", "save_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"{where}: {key} must be >= 0 (0: off), got {cfg[key]}")
    gpus = cfg["gpu_devices"]
    if gpus is not None and (not isinstance(gpus, list) or not gpus or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)):
        raise ConfigError(f"{where}: gpu_devices must be null or a list of CUDA device indices "
                          f"like [0] or [0, 1], got {gpus!r}")
    mb = cfg["micro_batchsize"]
    if mb not in (-1, None) and (mb <= 0 or cfg["batchsize"] % mb):
        raise ConfigError(f"{where}: micro_batchsize={mb} must divide batchsize={cfg['batchsize']}")


def read_config_file(path: str | os.PathLike, _seen: tuple[str, ...] = (),
                     extends: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """The keys of one YAML config file, and the files they came from. `extends: FILE` (relative
    to this file) starts from that file's keys; this file's override them, nested mappings key by
    key, so a family of configs (the distillation experiments) keeps one copy of what they share.
    `extends` given here replaces the file's own (a path as given): the same experiment on
    another student."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(loaded).__name__}")
    parent = loaded.pop("extends", None)
    if extends is not None:
        parent = os.fspath(extends)
    elif parent is None:
        return loaded, [path]
    elif not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be the path of one config file, got {parent!r}")
    else:
        parent = os.path.normpath(os.path.join(os.path.dirname(path), parent))
    if os.path.abspath(parent) in _seen + (os.path.abspath(path),):
        raise ConfigError(f"{path}: extends {parent}, which extends it back (a cycle)")
    base, chain = read_config_file(parent, _seen + (os.path.abspath(path),))
    return _deep_update(base, loaded), [path, *chain]


def _deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None, extends: str | os.PathLike | None = None) -> Config:
    """Load a YAML config (or none: the defaults), apply overrides, validate, return a Config.
    `extends`: a config file that replaces the file's own `extends` (read_config_file).

    Relative data/tokenizer/checkpoint paths stay as written (relative to the working directory,
    as in LaTeX-OCR).
    """
    notes: list[str] = []
    raw: dict = dict(base or {})
    where = "config"
    if path is not None:
        loaded, chain = read_config_file(path, extends=extends)
        where = " extending ".join(chain)
        raw.update(loaded)
    raw = _migrate(raw, notes)
    if overrides:
        try:
            raw = apply_overrides(raw, overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        raw = _migrate(raw, notes)
        where = f"{where} (with overrides {' '.join(overrides)})"
    raw = _debug_means_wandb(raw, notes)
    merged = _merge(DEFAULTS, raw, where)
    _check(merged, where)
    cfg = Config.fromDict(merged)
    cfg.notes = notes
    cfg.config_path = str(path) if path is not None else None
    return cfg


def to_dict(cfg: dict) -> dict:
    """Plain nested dict of the config's keys (for checkpoints and logs)."""
    return {key: copy.deepcopy(unmunchify(cfg[key])) for key in DEFAULTS}
