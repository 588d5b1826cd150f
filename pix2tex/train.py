"""Training: `python -m pix2tex.train --config settings/config.yaml [--resume] [key=value ...]`.

nanoGPT-style: `train()` is one visible `for` loop over optimizer steps; what surrounds it (device
and precision, optimizer and schedule, checkpoint state, validation, logging) are small functions
that `pix2tex.distill` reuses by passing its own model and `loss_fn`.

A *step* is one optimizer step over `batchsize` samples, global over DDP ranks (each rank takes
batchsize/world of them), split into micro batches of `micro_batchsize`. Every micro batch's loss
is weighted by its share of the step's target tokens, so the gradient is the token mean over the
whole step whatever the split: one process, gradient accumulation and N ranks give the same update.

Exact resume: batches are a pure function of (seed, epoch, batch index) and a checkpoint holds every
RNG state and the position in the epoch, so a resumed run skips the batches already seen and goes on
as the uninterrupted run would: bit-identical on CPU with `deterministic: true`. Validation runs
under `torch.random.fork_rng`, so validating (or not) never changes the training RNG stream.

`torchrun --nproc_per_node N -m pix2tex.train ...` trains data-parallel (NCCL on GPU, gloo on CPU).
SIGINT (Ctrl-C) and SIGTERM finish the current step, save `last.pth` and return; a second Ctrl-C
stops at once.
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import argparse
import bisect
import contextlib
import copy
import datetime
import inspect
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pix2tex.checkpoint import (CheckpointError, check_compatible, is_latex_ocr, is_training_state,
                                load_checkpoint, load_model_weights, model_state, newest_checkpoint,
                                remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from pix2tex.config import ConfigError, load_config, to_dict
from pix2tex.fileio import file_sha256
from pix2tex.malloc import keep_freed_memory
from pix2tex.models import fused_norm, resolve_device

# Metrics where a smaller value is better; every other one is maximized.
LOWER_IS_BETTER = {"edit_distance", "val_loss"}

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any]


def default_loss(model: torch.nn.Module, images: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The model's own loss: cross-entropy over the target tokens, padding ignored."""
    return model(images, tgt)


# --- device, precision, processes ------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: float32
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(cfg) -> Runtime:
    """Pick the device and precision; join the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda":
        gpus = cfg.get("gpu_devices")
        if gpus and len(gpus) < world:
            raise ConfigError(f"gpu_devices={gpus} names {len(gpus)} GPUs for {world} processes: "
                              f"name one per process, or drop gpu_devices")
        if gpus and world == 1 and len(gpus) > 1:
            raise ConfigError(f"gpu_devices={gpus}: training on several GPUs is one process per GPU "
                              f"here (LaTeX-OCR's DataParallel is not used): CUDA_VISIBLE_DEVICES="
                              f"{','.join(map(str, gpus))} torchrun --nproc_per_node {len(gpus)} "
                              f"-m pix2tex.train ... (and drop gpu_devices), or gpu_devices=[{gpus[0]}]")
        if gpus:
            device = torch.device("cuda", gpus[local_rank if world > 1 else 0])
        elif world > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp = torch.bfloat16 if precision == "bf16" else None
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on every step's activations (pix2tex/malloc.py)
        if amp is not None:
            fused_norm.load()  # channels-last backbone with a fused GroupNorm kernel (or PyTorch's)
    return Runtime(device, amp, rank, world)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Bit-exact kernels when asked for; otherwise allow the fast non-deterministic ones."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be exact
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few numbers over ranks (identity with one process)."""
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


# --- optimizer and schedule ------------------------------------------------------------------

def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optimizer.name` is any torch.optim class (AdamW, Adam, SGD, ...; case-insensitive); the
    group's other keys are passed where the class takes them. Biases and norms get no decay."""
    o = cfg.optimizer
    classes = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
               if isinstance(getattr(torch.optim, n), type)
               and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
               and n != "Optimizer"}
    cls = classes.get(str(o.name).lower())
    if cls is None:
        import difflib
        close = difflib.get_close_matches(str(o.name).lower(), list(classes), n=1)
        hint = f" Did you mean '{classes[close[0]].__name__}'?" if close else ""
        raise ConfigError(f"optimizer.name={o.name!r} is not a torch.optim optimizer.{hint}")
    accepted = inspect.signature(cls).parameters
    kwargs = {k: (tuple(o[k]) if k == "betas" else o[k]) for k in ("betas", "eps", "momentum")
              if k in accepted and o.get(k) is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if "fused" in accepted and params and params[0].device.type in ("cpu", "cuda"):
        kwargs["fused"] = True  # one kernel for the whole update: clearly faster on CPU and GPU
    return cls(groups, lr=o.lr, **kwargs)


def total_steps(cfg, steps_per_epoch: int) -> int:
    """Length of the LR schedule: `scheduler.total_steps`, else max_steps, else all epochs."""
    if cfg.scheduler.get("total_steps"):
        return int(cfg.scheduler.total_steps)
    n = cfg.epochs * steps_per_epoch
    return min(n, cfg.max_steps) if cfg.max_steps else n


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps: int):
    """The LR schedule, stepped once per optimizer step. `warmup_steps` ramps the LR up linearly
    for none/cosine/step/multistep; onecycle has its own warm-up (`pct_start`). Cosine with
    `cycle_steps` restarts (warm-up, then cosine to min_lr) every cycle_steps: a run trained in
    legs of whole cycles ends every leg at the bottom of its cycle, and the LR is a pure function
    of the step, so `--resume` with a larger max_steps simply goes on."""
    s = cfg.scheduler
    if s.name == "onecycle":
        # torch divides by the length of each phase: keep both at least two steps long.
        total = max(steps, 4)
        pct_start = min(max(s.pct_start, 2 / total), 1 - 2 / total)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optimizer.lr,
                                                   total_steps=total, pct_start=pct_start)
    warmup, min_ratio = int(s.warmup_steps), (s.min_lr / cfg.optimizer.lr if cfg.optimizer.lr else 0.0)
    milestones = sorted(s.milestones or [])

    cycle = int(s.cycle_steps)

    def factor(step: int) -> float:
        peak, end = 1.0, steps
        if cycle:  # warm restarts: each cycle a warm-up and a cosine whose last step is min_lr
            peak, step, end = s.cycle_decay ** (step // cycle), step % cycle, cycle - 1
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if s.name == "cosine":
            progress = min(1.0, max(0, step - warmup) / max(1, end - warmup))
            return ramp * (min_ratio + (peak - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if s.name == "step":
            return ramp * s.gamma ** (step // s.step_size)
        if s.name == "multistep":
            return ramp * s.gamma ** bisect.bisect_right(milestones, step)
        return ramp

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scheduler_step(scheduler) -> None:
    # OneCycleLR raises past its last step (a run extended on resume): hold the final LR instead.
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and \
            scheduler.last_epoch + 1 >= scheduler.total_steps:
        return
    scheduler.step()


# --- data ------------------------------------------------------------------------------------

def load_dataset(path: str | None, key: str):
    from pix2tex.dataset.dataset import Im2LatexDataset
    if not path:
        raise ConfigError(f"config key '{key}' is not set: give the dataset .pkl to use "
                          f"(e.g. {key}=dataset/train.pkl)")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: dataset file not found: {path} (build one with "
                          f"`python -m pix2tex.dataset.dataset`, or fix the path in the config)")
    return Im2LatexDataset.load(path)


def prepare_datasets(cfg, train_data, val_data, rt: Runtime) -> list[str]:
    """Configure batching and filtering, then refuse what cannot train, before any work is done.
    Returns lines that say how much of each dataset is used."""
    per_rank = cfg.batchsize // rt.world
    if cfg.batchsize % rt.world:
        raise ConfigError(f"batchsize={cfg.batchsize} must be divisible by the {rt.world} processes")
    micro = per_rank if cfg.micro_batchsize in (-1, None) else cfg.micro_batchsize
    if per_rank % micro:
        raise ConfigError(f"micro_batchsize={cfg.micro_batchsize} must divide the per-process "
                          f"batch of {per_rank} (batchsize {cfg.batchsize} over {rt.world} processes)")
    limits = dict(max_seq_len=cfg.max_seq_len, max_dimensions=(cfg.max_width, cfg.max_height),
                  min_dimensions=(cfg.min_width, cfg.min_height), seed=cfg.seed)
    train_data.update(batchsize=cfg.batchsize, shuffle=True, transform="train", skip_unknown=True,
                      pad=cfg.pad, **limits)
    if val_data is not None:  # validate on every sample: keep each size's last, smaller batch
        val_data.update(batchsize=cfg.testbatchsize, shuffle=False, transform="test",
                        keep_smaller_batches=True, pad=cfg.pad, **limits)
    lines = []
    for key, data in (("data", train_data), ("valdata", val_data)):
        if data is None:
            continue
        where = cfg[key] or key
        if not data.indices:
            unknown = " (labels with characters the tokenizer does not know are left out too)" \
                if data.skip_unknown else ""
            raise ConfigError(f"{where}: none of its {len(data.formulas)} samples fits "
                              f"max_seq_len={cfg.max_seq_len} and images within {cfg.min_width}x"
                              f"{cfg.min_height} .. {cfg.max_width}x{cfg.max_height} (width x "
                              f"height){unknown}; raise those limits or rebuild the dataset")
        odd = [] if cfg.pad else \
            sorted((w, h) for w, h in data.buckets() if w % cfg.patch_size or h % cfg.patch_size)
        if odd:
            raise ConfigError(f"{where}: image sizes must be multiples of patch_size="
                              f"{cfg.patch_size}, but {len(odd)} sizes are not (e.g. {odd[0][0]}x"
                              f"{odd[0][1]}); render with that patch size or change patch_size")
        batches = len(data.batch_plan(0))
        if batches == 0:
            raise ConfigError(f"{where}: no image size has batchsize={cfg.batchsize} samples (batches "
                              f"hold images of one size); lower batchsize or add data")
        lines.append(f"{key}: {len(data.indices)} of {len(data.formulas)} samples fit the limits, "
                     f"{batches} batches per epoch")
    return lines


def rank_share(size: int, rt: Runtime) -> slice:
    """This rank's rows of a global batch of `size` samples: a contiguous slice."""
    per = math.ceil(size / rt.world)
    return slice(rt.rank * per, (rt.rank + 1) * per)


class BatchSource(torch.utils.data.Dataset):
    """One epoch's batches for `DataLoader(batch_size=None)`: item i is (plan position start + i,
    images, targets, real) with this rank's rows of that global batch.

    Every rank loads the whole batch and keeps its rows: a batch's augmentation is one random
    stream over its samples, so loading only a slice would augment them differently from a
    single-process run. A rank left without rows (a last batch smaller than the world) gets one
    row with `real=False`, which it trains on with zero weight so that DDP stays in step."""

    def __init__(self, data, epoch: int, start: int, rt: Runtime):
        self.data, self.epoch, self.start, self.rt = data, epoch, start, rt
        self.plan = data.batch_plan(epoch)

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start)

    def __getitem__(self, i: int):
        index = self.start + i
        images, tgt = self.data.load_batch(self.plan[index], self.epoch, index)
        if self.rt.world == 1:
            return index, images, tgt, True
        rows = rank_share(len(images), self.rt)
        real = rows.start < len(images)
        rows = rows if real else slice(0, 1)
        return index, images[rows], tgt[rows], real


def epoch_batches(data, epoch: int, start: int, rt: Runtime, num_workers: int, seed: int):
    source = BatchSource(data, epoch, start, rt)
    # An explicit generator: a DataLoader iterator otherwise draws its seed from the global RNG,
    # and a resumed run (which starts mid-epoch) would draw it at a different point.
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.utils.data.DataLoader(source, batch_size=None, shuffle=False, num_workers=num_workers,
                                       generator=gen, persistent_workers=False,
                                       pin_memory=rt.device.type == "cuda")


def target_tokens(tgt: torch.Tensor, pad: int) -> int:
    """Positions the loss counts: every target token after BOS that is not padding (EOS included)."""
    return int((tgt[:, 1:] != pad).sum())


def micro_batches(images: torch.Tensor, tgt: torch.Tensor, size: int, pad: int):
    """Split a batch; trim each piece's targets to its own longest sequence."""
    for i in range(0, images.shape[0], size):
        t = tgt[i:i + size]
        longest = int((t != pad).sum(1).max())
        yield images[i:i + size], t[:, :max(longest, 2)]


# --- one optimizer step ------------------------------------------------------------------------

def forward_backward(model, loss_fn: LossFn, images, tgt, *, micro: int, weight: float, rt: Runtime,
                     pad: int) -> tuple[float, dict]:
    """Accumulate the gradients of one rank's share of a step. `weight` scales each micro batch's
    token-mean loss by (its tokens / the step's tokens over all ranks) × world, since DDP averages
    gradients over ranks. Returns the summed token-weighted loss and extra loss parts."""
    pieces = list(micro_batches(images, tgt, micro, pad))
    loss_sum, parts = 0.0, {}
    for i, (im, t) in enumerate(pieces):
        im = im.to(rt.device, non_blocking=True)
        t = t.to(rt.device, non_blocking=True)
        n = target_tokens(t, pad) if weight else 0
        last = i == len(pieces) - 1
        sync = model.no_sync() if (rt.world > 1 and not last and hasattr(model, "no_sync")) \
            else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                out = loss_fn(model, im, t)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            (loss * (n * weight * rt.world)).backward()
        loss_sum += float(loss.detach()) * n
        for k, v in extra.items():
            parts[k] = parts.get(k, 0.0) + float(v) * n
    return loss_sum, parts


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> float:
    """Clip, update, advance the schedule, clear gradients. Returns the gradient norm."""
    # foreach: one fused norm and one scale over all gradients (PyTorch loops per tensor on CPU)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"),
                                          foreach=True)
    optimizer.step()
    scheduler_step(scheduler)
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# --- validation ------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, data, tokenizer, cfg, rt: Runtime, max_batches: int,
             should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Validation loss, and BLEU / edit distance / token accuracy of greedy (or beam) generation,
    or sampling at `temperature` (seeded: every validation draws the same way), decoded in
    `eval_precision`, on `max_batches` validation batches spread over all image sizes. None when
    interrupted by a stop request."""
    from pix2tex.metrics import compute_metrics

    was_training = model.training
    model.eval()
    loss_sum = tokens = 0.0
    preds: list[str] = []
    refs: list[str] = []
    devices = [rt.device] if rt.device.type == "cuda" else []
    generator = torch.Generator(rt.device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    try:
        with torch.random.fork_rng(devices=devices):
            plan = data.batch_plan(0)
            # fewer than all: batches spread evenly over the plan, which is sorted by image size
            # (the first few alone would be the smallest images, one-symbol formulas)
            n = len(plan)
            picked = range(n) if max_batches >= n else \
                [round(i * (n - 1) / max(max_batches - 1, 1)) for i in range(max_batches)]
            for index in picked:
                indices = plan[index]
                if should_stop():
                    return None
                images, tgt = data.load_batch(indices, 0, index)
                images, tgt = images.to(rt.device), tgt.to(rt.device)
                with rt.autocast():
                    loss = model(images, tgt)
                # An untrained model rarely emits EOS: past twice the reference length a
                # prediction cannot score better, so stop there instead of at max_seq_len.
                # Outside autocast: eval_precision (fp32 by default) is what decodes, on any CPU.
                max_len = min(cfg.max_seq_len, 2 * tgt.shape[1] + 8)
                ids = model.generate(images, max_len=max_len, temperature=cfg.temperature,
                                     beam_width=cfg.val_beam_width, precision=cfg.eval_precision,
                                     generator=generator)
                n = target_tokens(tgt, cfg.pad_token)
                loss_sum += float(loss) * n
                tokens += n
                preds += tokenizer.decode_batch(ids.tolist())
                refs += tokenizer.decode_batch(tgt.tolist())
    finally:
        model.train(was_training)
    metrics = compute_metrics(preds, refs)
    metrics.pop("by_length", None)
    metrics["val_loss"] = loss_sum / max(tokens, 1)
    metrics["examples"] = [{"pred": p, "ref": r} for p, r in zip(preds, refs)][:cfg.test_samples]
    return metrics


def improved(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    if metric in LOWER_IS_BETTER:
        return value < best - min_delta
    return value > best + min_delta


# --- logging -----------------------------------------------------------------------------------

class MetricsLog:
    """`metrics.jsonl` in the run folder (always), and wandb when `wandb: true`."""

    def __init__(self, run_dir: str, cfg, enabled: bool, run_id: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if os.path.isfile(self.path):  # a killed run may have left half a line: end it
                with open(self.path, "rb+") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                        f.write(b"\n")
            if cfg.wandb:
                self.wandb = start_wandb(cfg, run_dir, run_id)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items()
                    if isinstance(v, (int, float)) and k not in ("step", "time")}
            for k, v in record.get("val", {}).items():
                if isinstance(v, (int, float)):
                    flat[f"val/{k}"] = v
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg, run_dir: str, run_id: str | None = None):
    """wandb run; offline unless a key is set or someone is at the terminal, so it never asks.
    `run_id` (the config's `id`, else the one the run's checkpoints keep) lets a resumed run
    continue its wandb run instead of starting a new one."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb: true needs the wandb package (pip install wandb), "
                          "or set wandb: false") from None
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") or sys.stdin.isatty() else "offline")
    return wandb.init(project="pix2tex", name=cfg.name, id=run_id, resume="allow", dir=run_dir,
                      config=to_dict(cfg), mode=mode)


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps; a second Ctrl-C stops at once."""

    def __init__(self):
        self.reason: str | None = None
        self.old: dict = {}

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# --- checkpoints -----------------------------------------------------------------------------

def gather_rng(rt: Runtime) -> list[dict]:
    """Every rank's RNG states (a collective: all ranks call it at the same step)."""
    own = rng_state()
    if rt.world == 1:
        return [own]
    states: list = [None] * rt.world
    dist.all_gather_object(states, own)
    return states


# --- the loop ----------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where a run stands; all of it goes into the checkpoint."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` done
    best: float | None = None  # best value of `best_metric`
    best_step: int | None = None
    monitor_best: float | None = None  # best value of the early-stopping monitor
    bad_validations: int = 0  # validations in a row without improvement of the monitor
    validated: bool = True  # the validation due at this point has run


@dataclass
class Run:
    """What the loop works on, built once by `start_run`; the helpers below take it whole."""
    cfg: Any
    rt: Runtime
    model: torch.nn.Module  # what `loss_fn` receives: maybe compiled and/or DDP-wrapped
    raw_model: torch.nn.Module  # the plain model: saved, validated, used for generation
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_data: Any
    val_data: Any
    tokenizer: Any
    tokenizer_path: str
    tokenizer_sha: str
    run_dir: str
    run_id: str  # kept across resumes: the wandb run id, so a resumed run continues its curves
    valdata_sha: str | None  # the validation pkl's content: best values compare on one set only
    micro: int  # micro batch size
    p: Progress
    log: MetricsLog
    stop: StopRequest
    say: Callable[[str], None]
    echo: Callable[[str], None] | None
    last_val: dict | None = None
    saved_step: int = -1  # the step last.pth holds
    t_log: float = 0.0  # time and samples since the last logged step, for samples/s
    samples_since: int = 0

    @property
    def max_steps(self) -> float:
        return self.cfg.max_steps or float("inf")


def run_folder(cfg) -> str:
    return os.path.join(cfg.model_path, cfg.name + ("-fast_dev_run" if cfg.fast_dev_run else ""))


def train(cfg, model: torch.nn.Module | None = None, loss_fn: LossFn | None = None,
          train_data=None, val_data=None, resume: bool = False,
          echo: Callable[[str], None] | None = None) -> dict:
    """Train `model` (default: `get_model(cfg)`) with `loss_fn(model, images, tgt) -> loss` (or
    `(loss, {part: value})`, token means; default: the model's own loss) on `train_data` /
    `val_data` (Im2LatexDataset; default: the config's `data` / `valdata` pkls). Under DDP the
    `model` that `loss_fn` receives is the DDP wrapper: call it (`model(images, tgt)`) so that
    gradients are synchronized. `resume` continues from `load_ckpt` if it is a training state,
    else from the run folder's checkpoint with the highest step. `echo` receives progress lines
    (None: silent, no progress bar).

    Returns a summary: final step and epoch, why it stopped, best metric, last validation metrics,
    run folder. torch's process-wide determinism switch is put back afterwards.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, model, loss_fn, train_data, val_data, resume, echo)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg, model, loss_fn, train_data, val_data, resume, echo) -> dict:
    run = start_run(cfg, model, loss_fn, train_data, val_data, resume, echo)
    p, reason = run.p, None
    with run.stop:
        # A checkpoint written before its validation ran (interrupted there): validate first,
        # as the uninterrupted run did at this point.
        if not p.validated and validation_due(run, len(run.train_data.batch_plan(p.epoch))):
            validate_and_select(run)
        run.t_log = time.time()
        while p.epoch < run.cfg.epochs and p.step < run.max_steps and reason is None:
            reason = train_epoch(run)
        reason = finish(run, reason)
    run.log.write({"step": p.step, "epoch": p.epoch, "event": "stop", "reason": reason})
    run.log.close()
    return {"step": p.step, "epoch": p.epoch, "reason": reason, "best": p.best,
            "best_step": p.best_step, "best_metric": run.cfg.best_metric, "metrics": run.last_val,
            "run_dir": run.run_dir}


def train_epoch(run: Run) -> str | None:
    """The rest of epoch `p.epoch`, step by step; returns why the run stops, or None to go on."""
    p, cfg = run.p, run.cfg
    plan = run.train_data.batch_plan(p.epoch)
    bar = None
    if run.echo is not None and run.rt.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), initial=p.batch_in_epoch, desc=f"epoch {p.epoch}",
                   dynamic_ncols=True, leave=False)
    reason = None
    for index, images, tgt, real in epoch_batches(run.train_data, p.epoch, p.batch_in_epoch,
                                                  run.rt, cfg.num_workers, cfg.seed):
        if not train_step(run, index, images, tgt, real, len(plan[index]), bar):
            reason = run.stop.reason or "signal"
            break
        reason = after_step(run, len(plan))
        if reason is not None:
            break
    if bar is not None:
        bar.close()
    if reason is None and p.batch_in_epoch >= len(plan):
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    return reason


def train_step(run: Run, index: int, images, tgt, real: bool, samples: int, bar) -> bool:
    """One optimizer step on batch `index`, logged; False (no step taken) when asked to stop."""
    p, rt = run.p, run.rt
    # One collective per step: the step's target tokens over all ranks, and whether any rank was
    # asked to stop (so that all stop after the same step).
    local_tokens = target_tokens(tgt, run.cfg.pad_token) if real else 0
    tokens, stop_flags = all_sum([local_tokens, float(run.stop.reason is not None)], rt)
    if stop_flags:
        return False
    lr = run.optimizer.param_groups[0]["lr"]
    loss_sum, parts = forward_backward(
        run.model, run.loss_fn, images, tgt, micro=run.micro, rt=rt, pad=run.cfg.pad_token,
        weight=1.0 / max(tokens, 1) if real else 0.0)
    grad_norm = optimizer_step(run.model, run.optimizer, run.scheduler, run.cfg.grad_clip)
    p.step, p.batch_in_epoch, p.validated = p.step + 1, index + 1, False
    run.samples_since += samples

    summed = all_sum([loss_sum, *parts.values()], rt)  # on every rank, every step
    loss = summed[0] / max(tokens, 1)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
    if p.step % run.cfg.log_freq == 0:
        now = time.time()
        run.log.write({"step": p.step, "epoch": p.epoch, "batch": p.batch_in_epoch,
                       "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": run.samples_since / max(now - run.t_log, 1e-9),
                       **{k: v / max(tokens, 1) for k, v in zip(parts, summed[1:])}})
        run.t_log, run.samples_since = now, 0
    return True


def validation_due(run: Run, plan_len: int) -> bool:
    p = run.p
    # also at max_steps: the end of the LR schedule is the model best.pth should get to see
    return p.step > 0 and (p.step % run.cfg.sample_freq == 0 or p.batch_in_epoch == plan_len
                           or p.step == run.max_steps)


def after_step(run: Run, plan_len: int) -> str | None:
    """Validation, early stopping and checkpoints due after a step; why to stop, or None."""
    p, cfg = run.p, run.cfg
    reason = None
    if validation_due(run, plan_len):
        validate_and_select(run)
        if cfg.early_stopping.patience and p.bad_validations >= cfg.early_stopping.patience:
            reason = "early_stopping"
    if p.validated or (cfg.save_steps and p.step % cfg.save_steps == 0):
        save_state(run, "last.pth")
    if cfg.save_freq and p.batch_in_epoch == plan_len and (p.epoch + 1) % cfg.save_freq == 0:
        save_state(run, f"{cfg.name}_e{p.epoch + 1:02d}.pth")  # LaTeX-OCR's: every n-th epoch
    if reason is None and p.step >= run.max_steps:
        reason = "max_steps"
    return reason


def finish(run: Run, reason: str | None) -> str:
    """Why the run stopped, after leaving a resumable last.pth of its final step."""
    p = run.p
    reason = reason or ("max_steps" if p.step >= run.max_steps else "epochs")
    if run.stop.reason is not None and reason != run.stop.reason:
        reason = run.stop.reason  # asked to stop during the last validation
    interrupted = reason in ("SIGINT", "SIGTERM", "signal")
    if run.saved_step != p.step or interrupted:
        save_state(run, "last.pth", interrupted=interrupted)
    return reason


def validate_and_select(run: Run) -> bool:
    """Validate on rank 0, keep best.pth, count towards early stopping. False if interrupted."""
    if run.val_data is None:
        return True
    p, cfg, rt = run.p, run.cfg, run.rt
    result = None
    if rt.main:
        t0 = time.time()
        result = validate(run.raw_model, run.val_data, run.tokenizer, cfg, rt, cfg.valbatches,
                          lambda: run.stop.reason is not None)
        if result is not None:
            result["seconds"] = round(time.time() - t0, 2)
    if rt.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result is None:
        return False
    run.last_val, p.validated = result, True
    es = cfg.early_stopping
    if es.patience:
        monitor = es.monitor or cfg.best_metric
        if improved(monitor, result[monitor], p.monitor_best, es.min_delta):
            p.monitor_best, p.bad_validations = result[monitor], 0
        else:
            p.bad_validations += 1
    if improved(cfg.best_metric, result[cfg.best_metric], p.best):
        p.best, p.best_step = result[cfg.best_metric], p.step
        save_state(run, "best.pth")
    run.log.write({"step": p.step, "epoch": p.epoch, "val": result})
    run.say(f"step {p.step} validation: " + ", ".join(
        f"{k} {result[k]:.4f}" for k in ("val_loss", "bleu", "edit_distance", "token_accuracy")))
    for ex in result["examples"]:
        run.say(f"  pred: {ex['pred']}\n  ref:  {ex['ref']}")
    return True


def save_state(run: Run, name: str, interrupted: bool = False) -> None:
    """The whole training state as `name` in the run folder (a collective: all ranks call it)."""
    p, cfg = run.p, run.cfg
    rng = gather_rng(run.rt)
    if run.rt.main:
        save_checkpoint({
            "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng,
            "epoch": p.epoch, "step": p.step, "batch_in_epoch": p.batch_in_epoch,
            "best": p.best, "best_step": p.best_step, "best_metric": cfg.best_metric,
            "early_stopping": {"monitor_best": p.monitor_best,
                               "bad_validations": p.bad_validations},
            "validated": p.validated, "interrupted": interrupted,
            "metrics": _numbers(run.last_val or {}), "world_size": run.rt.world,
            "run_id": run.run_id, "valdata_sha256": run.valdata_sha,
            "config": to_dict(cfg), "tokenizer": run.tokenizer_path,
            "tokenizer_sha256": run.tokenizer_sha}, os.path.join(run.run_dir, name))
    if name == "last.pth":
        run.saved_step = p.step


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# --- setting a run up ----------------------------------------------------------------------------

def start_run(cfg, model, loss_fn, train_data, val_data, resume: bool, echo) -> Run:
    """Config, runtime, data, model, optimizer and schedule, and the resumed state when asked."""
    cfg = copy.deepcopy(cfg)
    if cfg.fast_dev_run:  # a couple of train and val batches, end to end
        cfg.max_steps = min(cfg.max_steps or 2, 2)
        cfg.sample_freq, cfg.valbatches, cfg.epochs = 2, min(cfg.valbatches, 2), 1
    rt = setup_runtime(cfg)
    say = echo if (echo is not None and rt.main) else (lambda line: None)
    set_determinism(cfg.deterministic, rt.device)
    run_dir = run_folder(cfg)

    # Data first: a missing file or a dataset that cannot fit is said before any real work.
    train_data, val_data, (tokenizer, tokenizer_path, tokenizer_sha) = load_data(
        cfg, train_data, val_data, rt, say)
    micro = cfg.batchsize // rt.world if cfg.micro_batchsize in (-1, None) else cfg.micro_batchsize

    # Model: identical initial weights on every rank (seeded), then per-rank training randomness.
    seed_everything(cfg.seed)
    if model is None:
        from pix2tex.models import get_model
        model = get_model(cfg)
    model.to(rt.device)
    ckpt = None
    if resume:
        ckpt = resume_checkpoint(cfg, run_dir, model, tokenizer_sha, say)
    elif cfg.load_ckpt:
        weights = load_checkpoint(cfg.load_ckpt)
        check_compatible(weights, to_dict(cfg), tokenizer_sha, cfg.load_ckpt)
        load_model_weights(model, weights, cfg.load_ckpt)
        if is_latex_ocr(model_state(weights)):
            cfg.decoder_bias = True  # the model gained its decoder's biases; checkpoints say so
        say(f"starting from the weights of {cfg.load_ckpt}")
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps(cfg, len(train_data.batch_plan(0))))
    valdata_sha = file_sha256(cfg.valdata) if val_data is not None and cfg.valdata else None
    if ckpt is not None:
        p = restore_progress(ckpt, optimizer, scheduler, cfg, rt, say)
        if ckpt.get("valdata_sha256") and valdata_sha and ckpt["valdata_sha256"] != valdata_sha:
            # a best value measured on other validation formulas says nothing about these
            p.best = p.best_step = p.monitor_best = None
            p.bad_validations = 0
            say(f"note: the validation set {cfg.valdata} is not the one this run validated on so "
                f"far: its best {cfg.best_metric} starts afresh (best.pth is replaced at the next "
                f"validation)")
    else:
        p = Progress()
        seed_everything(cfg.seed + rt.rank)

    wrapped = model
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    if rt.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    wrapped.train()
    if rt.main:
        os.makedirs(run_dir, exist_ok=True)
        remove_stale_temporaries(run_dir)
    run_id = cfg.id or (ckpt or {}).get("run_id") or uuid.uuid4().hex[:8]
    return Run(cfg=cfg, rt=rt, model=wrapped, raw_model=model, loss_fn=loss_fn or default_loss,
               optimizer=optimizer, scheduler=scheduler, train_data=train_data,
               val_data=val_data, tokenizer=tokenizer, tokenizer_path=tokenizer_path,
               tokenizer_sha=tokenizer_sha, run_dir=run_dir, run_id=run_id,
               valdata_sha=valdata_sha, micro=micro, p=p,
               log=MetricsLog(run_dir, cfg, enabled=rt.main, run_id=run_id), stop=StopRequest(),
               say=say, echo=echo, saved_step=p.step if ckpt is not None else -1)


def load_data(cfg, train_data, val_data, rt: Runtime, say):
    """The datasets (the config's pkls unless given) and the tokenizer they were encoded with:
    (train_data, val_data, (tokenizer, its path, its sha256)). Checks they fit the model."""
    if train_data is None:
        train_data = load_dataset(cfg.data, "data")
    if val_data is None and cfg.valdata:
        val_data = load_dataset(cfg.valdata, "valdata")
    from pix2tex.dataset.tokenizer import load_tokenizer
    tokenizer_path = cfg.tokenizer or getattr(train_data, "tokenizer_path", None)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)
    for data, key in ((train_data, "data"), (val_data, "valdata")):
        own = getattr(data, "tokenizer_path", None)
        if data is not None and own and file_sha256(own) != tokenizer_sha:
            raise ConfigError(f"{cfg[key] or key} was tokenized with {own}, but the config's "
                              f"tokenizer is {tokenizer_path} (other content): the labels would "
                              f"be read with the wrong vocabulary; drop `tokenizer` or rebuild")
    if len(tokenizer) > cfg.num_tokens:
        raise ConfigError(f"the tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model "
                          f"num_tokens={cfg.num_tokens}; set num_tokens >= {len(tokenizer)}")
    for line in prepare_datasets(cfg, train_data, val_data, rt):
        say(line)
    return train_data, val_data, (tokenizer, tokenizer_path, tokenizer_sha)


def resume_checkpoint(cfg, run_dir: str, model, tokenizer_sha: str, say) -> dict:
    """The training state `--resume` continues (its weights loaded into `model`): `load_ckpt` when
    it is one, else the run folder's checkpoint with the highest step (also when `load_ckpt` is
    the weights a fine-tuning run started from)."""
    source = cfg.load_ckpt or newest_checkpoint(run_dir)
    if source is None:
        raise CheckpointError(f"--resume: no load_ckpt set and no checkpoint in {run_dir}")
    # on the CPU: RNG states must stay there; the optimizer's load_state_dict moves its tensors
    # to the parameters' device
    ckpt = load_checkpoint(source)
    own = newest_checkpoint(run_dir) if not is_training_state(ckpt) else None
    if own is not None:
        source, ckpt = own, load_checkpoint(own)
    if not is_training_state(ckpt):
        raise CheckpointError(f"{source} holds weights only, not a training state; start a "
                              f"new run from it with load_ckpt={source} (without --resume)")
    check_compatible(ckpt, to_dict(cfg), tokenizer_sha, source)
    if ckpt.get("best_metric") not in (None, cfg.best_metric):
        raise ConfigError(f"{source}: its run keeps best.pth by {ckpt['best_metric']}, this config "
                          f"by {cfg.best_metric}; set best_metric={ckpt['best_metric']} to resume "
                          f"it, or start a new run")
    load_model_weights(model, ckpt, source)
    say(f"resuming from {source} at step {ckpt['step']} (epoch {ckpt['epoch']}, "
        f"batch {ckpt['batch_in_epoch']})")
    return ckpt


def restore_progress(ckpt: dict, optimizer, scheduler, cfg, rt: Runtime, say) -> Progress:
    """Optimizer, schedule and RNG state from a training checkpoint; where the run stood."""
    optimizer.load_state_dict(ckpt["optimizer"])
    saved_total = (ckpt["scheduler"] or {}).get("total_steps")
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and saved_total and \
            saved_total != scheduler.total_steps:
        # max_steps changed on resume: follow the new schedule from the current step on
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(ckpt["step"], scheduler.total_steps - 1)):
                scheduler.step()
        say(f"note: LR schedule re-planned from {saved_total} to {scheduler.total_steps} steps "
            f"(max_steps changed); step {ckpt['step']} continues at lr "
            f"{optimizer.param_groups[0]['lr']:.3g}")
    else:
        scheduler.load_state_dict(ckpt["scheduler"])
    p = Progress(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                 best=ckpt.get("best"), best_step=ckpt.get("best_step"),
                 **ckpt.get("early_stopping", {}), validated=ckpt.get("validated", True))
    states = ckpt.get("rng") or []
    if len(states) == rt.world:
        set_rng_state(states[rt.rank])
    else:
        seed_everything(cfg.seed + p.step + rt.rank)
        say(f"note: the checkpoint was written by {len(states)} processes, now {rt.world}: "
            f"random state re-seeded, the run will not repeat the original exactly")
    return p


# --- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pix2tex.train",
        description="Train the formula recognizer. Overrides are dotted key=value pairs on top of "
                    "the YAML (e.g. batchsize=8 optimizer.lr=3e-4), validated like the file.")
    parser.add_argument("--config", default="settings/config.yaml", help="YAML config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from load_ckpt, or from the newest checkpoint of the run folder")
    parser.add_argument("--no_cuda", "--no-cuda", action="store_true",
                        help="train on the CPU (device=cpu), as LaTeX-OCR's flag")
    parser.add_argument("--debug", action="store_true",
                        help="as LaTeX-OCR's flag: debug=true, no wandb, DEBUG-level log messages")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.no_cuda:
        args.overrides = ["device=cpu", *args.overrides]
    if args.debug:
        args.overrides = ["debug=true", "wandb=false", *args.overrides]
        logging.basicConfig(level=logging.DEBUG)
    from pix2tex.dataset.dataset import DatasetError
    from pix2tex.dataset.tokenizer import TokenizerError
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for note in cfg.notes:
            print(f"note: {note}", file=sys.stderr)
    try:
        result = train(cfg, resume=args.resume, echo=_echo)
    except (ConfigError, CheckpointError, DatasetError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        best = "none" if result["best"] is None else f"{result['best']:.4f}"
        print(f"stopped ({result['reason']}) at step {result['step']}; best {result['best_metric']} "
              f"{best}; checkpoints in {result['run_dir']}")


def _echo(line: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(line, file=sys.stderr)


if __name__ == "__main__":
    main()
