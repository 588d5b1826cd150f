"""Knowledge distillation: `python -m pix2tex.distill --config settings/distill/target_soft.yaml
[--resume] [key=value ...]` (or `python distill.py ...`).

The config is the student's (model keys, data, training keys, as for train.py) plus the `distill`
group: the frozen teacher's config and checkpoint and the weight of each loss (pix2tex.distill.losses),
all masked so that padding never counts:

    loss = r_target    * CE(student, labels)               ground truth, or the teacher's beam outputs
         + r_soft      * KL(teacher_T || student_T) * T²   Hinton et al. (2015)
         + r_hard      * CE(student, teacher argmax)
         + r_embedding * d(P student hidden, teacher hidden) encoder output (+ decoder states)

Sequence-level KD (Kim & Rush, 2016): with `distill.pseudo_labels: labels.pkl` the student trains on
the training images labelled with the teacher's beam-search outputs (pix2tex.distill.pseudo_labels;
the CLI makes the file first when it is missing).

`Distiller` holds the student and the learned projections of the embedding loss; `pix2tex.train.train`
trains and checkpoints it (resume, validation, logging as for training). The teacher stays outside
its parameters and state dict: eval mode, no gradients, one encoder pass per batch. At the end the
student alone is exported as a plain checkpoint, `<run>/student/best.pth`, that eval.py, predict and
export load like any model; the CLI then evaluates teacher and student side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

from pix2tex.checkpoint import (CheckpointError, check_compatible, load_checkpoint, load_model_weights,
                                save_checkpoint)
from pix2tex.config import ConfigError, load_config, to_dict
from pix2tex.distill.losses import EmbeddingLoss, hard_loss, match_grid, soft_loss, target_loss
from pix2tex.distill.pseudo_labels import check_pseudo_labels
from pix2tex.distill.teacher import load_teacher, model_digest
from pix2tex.fileio import atomic_write_text

WEIGHTS = ("r_target", "r_soft", "r_hard", "r_embedding")


# --- does the teacher fit the student --------------------------------------------------------

def check_pair(cfg, tcfg, teacher_ckpt: dict, tokenizer_sha: str | None) -> None:
    """Refuse a teacher whose token ids or image limits do not fit the student's config."""
    d, where = cfg.distill, cfg.distill.teacher_ckpt
    saved = teacher_ckpt.get("tokenizer_sha256")
    if saved and tokenizer_sha and saved != tokenizer_sha:
        raise ConfigError(f"the teacher {where} was trained with another tokenizer "
                          f"({teacher_ckpt.get('tokenizer')!r}) than the student's: token ids would "
                          f"not mean the same symbols; distill with the teacher's tokenizer")
    if (d.r_soft or d.r_hard) and tcfg.num_tokens != cfg.num_tokens:
        raise ConfigError(f"r_soft/r_hard compare output distributions, but the teacher has "
                          f"num_tokens={tcfg.num_tokens} and the student {cfg.num_tokens}: "
                          f"give the student num_tokens={tcfg.num_tokens}")
    if cfg.max_height > tcfg.max_height or cfg.max_width > tcfg.max_width or \
            cfg.patch_size % tcfg.patch_size or cfg.max_seq_len > tcfg.max_seq_len:
        raise ConfigError(f"the student's images and sequences must fit the teacher's: student "
                          f"{cfg.max_height}x{cfg.max_width}, patch_size {cfg.patch_size}, max_seq_len "
                          f"{cfg.max_seq_len}; teacher {tcfg.max_height}x{tcfg.max_width}, patch_size "
                          f"{tcfg.patch_size}, max_seq_len {tcfg.max_seq_len} (the student's "
                          f"patch_size must be a multiple of the teacher's)")


# --- the trained module ----------------------------------------------------------------------

def _grid_tokens(model, memory: torch.Tensor) -> torch.Tensor:
    """Encoder memory without its prefix tokens (the ViT class token): the image grid only."""
    return memory[:, getattr(model.encoder, "num_prefix_tokens", 0):]


class Distiller(nn.Module):
    """Student + the projection heads of the embedding loss; the teacher rides along, frozen.

    `distiller(images, tgt)` is the student's own loss (validation); `distiller(images, tgt,
    distill=True)` returns (weighted total, {part: value}). `generate` is the student's."""

    def __init__(self, student: nn.Module, teacher: nn.Module, distill_cfg):
        super().__init__()
        d = distill_cfg
        for key in WEIGHTS:
            if d[key] < 0:
                raise ConfigError(f"distill.{key}={d[key]} must be >= 0")
        if not any(d[key] for key in WEIGHTS):
            raise ConfigError(f"all of distill.{', '.join(WEIGHTS)} are 0: nothing to train on")
        if d.temperature <= 0:
            raise ConfigError(f"distill.temperature={d.temperature} must be > 0")
        self.student = student
        # Held in a plain list, not as a submodule: the teacher's weights are neither trained, nor
        # saved with the student, nor counted as its parameters. `_apply` below still moves it.
        self._frozen = [teacher.eval().requires_grad_(False)]
        self.weights = {"target": d.r_target, "soft": d.r_soft, "hard": d.r_hard}
        self.temperature = d.temperature
        self.r_embedding = d.r_embedding
        s_dim, t_dim = student.decoder.net.attn_layers.dim, teacher.decoder.net.attn_layers.dim
        if d.r_embedding:
            self.embed_encoder = EmbeddingLoss(s_dim, t_dim, d.embedding_loss)
            if d.embed_decoder:
                self.embed_decoder = EmbeddingLoss(s_dim, t_dim, d.embedding_loss)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)  # .to(device) / .to(dtype) move the teacher too
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # always: no dropout in the teacher
        return self

    @property
    def teacher(self) -> nn.Module:
        return self._frozen[0]

    @property
    def needs_teacher(self) -> bool:
        return bool(self.weights["soft"] or self.weights["hard"] or self.r_embedding)

    def forward(self, images: torch.Tensor, tgt: torch.Tensor, distill: bool = False):
        if not distill:
            return self.student(images, tgt)
        return self.losses(images, tgt)

    def losses(self, images: torch.Tensor, tgt: torch.Tensor):
        """(weighted total, {part: unweighted value}) for a batch `tgt` = BOS, tokens, EOS, PAD."""
        tgt_in = tgt[:, :-1]
        labels = self.student.loss_labels(tgt)  # -100 at padding and after EOS
        mask = labels != -100
        s_logits, s_hidden = self.student.logits(images, tgt_in, return_hidden=True)
        parts = {}
        if self.weights["target"]:
            parts["target"] = target_loss(s_logits, labels, pad_token=-100)
        if self.needs_teacher:
            with torch.no_grad():
                t_logits, t_hidden = self.teacher.logits(images, tgt_in, return_hidden=True)
            if self.weights["soft"]:
                parts["soft"] = soft_loss(s_logits, t_logits, mask, self.temperature)
            if self.weights["hard"]:
                parts["hard"] = hard_loss(s_logits, t_logits, mask)
            if self.r_embedding:
                s_grid = _grid_tokens(self.student, s_hidden["encoder"])
                t_grid = _grid_tokens(self.teacher, t_hidden["encoder"])
                s_grid = match_grid(s_grid, t_grid.shape[1], tuple(images.shape[-2:]))
                parts["embed_encoder"] = self.embed_encoder(s_grid, t_grid.detach())
                if hasattr(self, "embed_decoder"):
                    parts["embed_decoder"] = self.embed_decoder(s_hidden["decoder"],
                                                                t_hidden["decoder"].detach(), mask)
        total = sum(self.weights.get(k, self.r_embedding) * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    def generate(self, *args, **kwargs):
        return self.student.generate(*args, **kwargs)


def distill_loss(model, images, tgt):
    """train()'s loss_fn: calls the (possibly DDP-wrapped) Distiller so gradients synchronize."""
    return model(images, tgt, distill=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the run ---------------------------------------------------------------------------------

def student_from(state: dict) -> dict:
    """The student's weights inside a Distiller state dict (or a plain model's state dict)."""
    if any(k.startswith("student.") for k in state):
        return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    return state


def export_student(run_dir: str, teacher_ckpt: str | None = None, which: str = "best") -> str:
    """`<run>/student/<which>.pth` from the run's <which>.pth (`best`, else last.pth; or `last`):
    the student's weights, config and tokenizer, a checkpoint like train.py's that eval, predict
    and release load. Returns it."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    source = os.path.join(run_dir, f"{which}.pth")
    if not os.path.isfile(source):
        source = os.path.join(run_dir, "last.pth")
    ckpt = load_checkpoint(source)
    out = os.path.join(run_dir, "student", f"{which}.pth")  # a subfolder: --resume never picks it
    save_checkpoint({"model": student_from(ckpt["model"]), "config": ckpt["config"],
                     "tokenizer": ckpt.get("tokenizer"), "tokenizer_sha256": ckpt.get("tokenizer_sha256"),
                     "metrics": ckpt.get("metrics", {}), "distilled_step": ckpt.get("step"),
                     "distilled_from": teacher_ckpt}, out)
    return out


def distill(cfg, resume: bool = False, echo=None, train_data=None, val_data=None) -> dict:
    """Train the student of `cfg` against its teacher with `pix2tex.train.train`; export the
    student. Returns train()'s summary plus `student_checkpoint` and `teacher` (the frozen model)."""
    import copy

    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.models import get_model
    from pix2tex.fileio import file_sha256 as _sha
    from pix2tex.train import run_folder, seed_everything, train

    cfg = copy.deepcopy(cfg)
    d = cfg.distill
    teacher, tcfg, tckpt = load_teacher(d.teacher_ckpt, d.teacher_config)
    tokenizer_path = cfg.tokenizer or getattr(train_data, "tokenizer_path", None)
    check_pair(cfg, tcfg, tckpt, _sha(tokenizer_path))
    if d.pseudo_labels and train_data is None:
        if not os.path.isfile(d.pseudo_labels):
            raise ConfigError(f"distill.pseudo_labels: {d.pseudo_labels} not found; make it with "
                              f"`python -m pix2tex.distill.pseudo_labels --config {cfg.config_path}`")
        check_pseudo_labels(d.pseudo_labels, model_digest(teacher), cfg.eval_precision)
        train_data = Im2LatexDataset.load(d.pseudo_labels)
        cfg.data = d.pseudo_labels  # what the student trains on: named in messages and the checkpoint

    seed_everything(cfg.seed)  # the same initial student as `train.py` would build
    student = get_model(cfg)
    run_dir = run_folder(cfg)
    if resume:
        # resume the Distiller's own checkpoint; a plain student checkpoint in load_ckpt only
        # initializes the student of a new run
        if cfg.load_ckpt and not any(k.startswith("student.") for k in
                                     load_checkpoint(cfg.load_ckpt).get("model", {})):
            cfg.load_ckpt = None
    elif cfg.load_ckpt:
        weights = load_checkpoint(cfg.load_ckpt)
        check_compatible(weights, to_dict(cfg), _sha(tokenizer_path), cfg.load_ckpt)
        load_model_weights(student, {"model": student_from(weights.get("model", weights))},
                           cfg.load_ckpt)
        if echo:
            echo(f"student starts from the weights of {cfg.load_ckpt}")
        cfg.load_ckpt = None
    elif d.init_from_teacher:
        from pix2tex.distill.weight_selection import select_weights

        counts = select_weights(student, teacher)
        if echo:
            echo(f"student starts from the teacher's weights (weight selection): {counts}")
    model = Distiller(student, teacher, d)
    summary = train(cfg, model=model, loss_fn=distill_loss, train_data=train_data, val_data=val_data,
                    resume=resume, echo=echo)
    summary["student_checkpoint"] = export_student(run_dir, d.teacher_ckpt)
    summary["teacher"], summary["teacher_config"] = teacher, tcfg
    summary["student"] = student
    return summary


# --- teacher and student side by side -----------------------------------------------------------

class _Timed(nn.Module):
    """A model whose `generate` adds its wall time to `seconds` (for eval.evaluate)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def generate(self, images, **kwargs):
        t0 = time.perf_counter()
        ids = self.model.generate(images, **kwargs)
        if ids.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return ids


def decode_ms(models: dict, dataset, device, batches: int = 4, rounds: int = 3,
              beam_width: int = 1, fixed_len: int | None = None) -> dict:
    """Milliseconds per formula of greedy (or beam) decoding, encoder included, on the first
    `batches` batches: the models take turns on the same batches, `rounds` times, and the median
    round counts, so a busy machine slows them alike. `fixed_len`: every formula decodes exactly
    that many tokens (the architectures' speed, whatever each model would output)."""
    import statistics
    plan = dataset.batch_plan(0)[:batches]
    loaded = [dataset.load_batch(b, 0, i)[0].to(device) for i, b in enumerate(plan)]
    n = sum(len(b) for b in plan)
    kwargs = dict(beam_width=beam_width)
    if fixed_len:
        kwargs.update(max_len=fixed_len, min_len=fixed_len)
    times = {name: [] for name in models}
    for model in models.values():  # warm-up (inference copies, allocator)
        model.to(device).generate(loaded[0][:1], **kwargs)
    for _ in range(rounds):
        for name, model in models.items():
            timed = _Timed(model)
            for images in loaded:
                timed.generate(images, **kwargs)
            times[name].append(timed.seconds)
    return {name: 1000 * statistics.median(t) / max(n, 1) for name, t in times.items()}


def compare(models: dict, dataset, tokenizer, *, device="cpu", beam_width: int = 1,
            max_batches: int | None = None, timing_batches: int = 4, timing_rounds: int = 3,
            fixed_len: int = 32, progress: bool = False, image_match: bool = False) -> dict:
    """Metrics of each model (eval.evaluate on `dataset`, prepared by the caller, in fp32; with
    `image_match` also the share of predictions that render like the ground truth), its parameter
    count, and decode milliseconds per formula: `decode_ms` as each model decodes (it stops at its
    own EOS) and `decode_ms_fixed` at exactly `fixed_len` tokens. Returns {name: {metric: value}}."""
    from pix2tex.eval import evaluate
    out = {}
    keys = ("bleu", "edit_distance", "token_accuracy", "exact_match", "n") + \
        (("image_match",) if image_match else ())
    for name, model in models.items():
        scores, _ = evaluate(model, dataset, tokenizer, beam_width=beam_width, device=device,
                             max_batches=max_batches, progress=progress, image_match=image_match)
        out[name] = {k: scores[k] for k in keys}
        out[name]["params"] = count_parameters(model)
    for key, length in (("decode_ms", None), ("decode_ms_fixed", fixed_len)):
        for name, ms in decode_ms(models, dataset, device, timing_batches, timing_rounds,
                                  beam_width, length).items():
            out[name][key] = ms
    return out


def aggregate(runs: list[dict]) -> dict:
    """Several seeds' results of one model (`compare` rows) as one row: each metric's mean, its
    sample standard deviation as `<metric>_std` (with two runs or more), and `runs`."""
    import statistics
    out = {"runs": len(runs)}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if not isinstance(value, (int, float)) or len(values) != len(runs):
            continue
        out[key] = statistics.fmean(values)
        if len(runs) > 1 and key not in ("n", "params"):
            out[f"{key}_std"] = statistics.stdev(values)
    return out


def markdown_table(results: dict, reference: str | None = None) -> str:
    """Rows: models; columns: the metrics of `compare` (image match when measured; mean ± standard
    deviation over seeds for `aggregate` rows) and the parameter ratio and speed-ups over
    `reference`."""
    metrics = [("BLEU", "bleu"), ("edit dist", "edit_distance"), ("token acc", "token_accuracy"),
               ("exact match", "exact_match")]
    if any("image_match" in r for r in results.values()):
        metrics.append(("image match", "image_match"))
    seeds = any(r.get("runs", 1) > 1 for r in results.values())
    head = ["model", "params"] + [h for h, _ in metrics] + ["decode ms/formula"]
    head += ["seeds"] if seeds else []
    ref = results.get(reference) if reference else None
    if ref:
        head += ["params ratio", "speed-up", "speed-up at fixed length"]

    def cell(r, key):
        if key not in r:
            return "-"
        std = f" ± {r[key + '_std']:.4f}" if key + "_std" in r else ""
        return f"{r[key]:.4f}{std}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, f"{r['params'] / 1e6:.2f}M", *(cell(r, k) for _, k in metrics),
                 f"{r['decode_ms']:.2f}"]
        cells += [str(r.get("runs", 1))] if seeds else []
        if ref:
            cells += [f"{r['params'] / ref['params']:.3f}", f"{ref['decode_ms'] / r['decode_ms']:.2f}x",
                      f"{ref['decode_ms_fixed'] / r['decode_ms_fixed']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pix2tex.distill",
        description="Distill a trained teacher into the smaller student of the config (its "
                    "`distill` group names the teacher and the loss weights), then evaluate both. "
                    "Overrides are dotted key=value pairs (e.g. distill.r_soft=0.5 max_steps=1000).")
    parser.add_argument("--config", default="settings/distill/target_soft.yaml",
                        help="the student's config with its distill group")
    parser.add_argument("--student", help="a student config that replaces the one the --config "
                                          "file extends (e.g. settings/distill/student-cpu.yaml: "
                                          "the student of the shipped reader)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from load_ckpt, or from the newest checkpoint of the run folder")
    parser.add_argument("--eval-data", help="pkl to compare teacher and student on (default: valdata)")
    parser.add_argument("--eval-batches", type=int, help="compare on the first N batches only")
    parser.add_argument("--no-eval", action="store_true", help="train and export only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from pix2tex.dataset.dataset import DatasetError, Im2LatexDataset
    from pix2tex.dataset.tokenizer import TokenizerError, load_tokenizer
    from pix2tex.train import _echo

    errors = (ConfigError, CheckpointError, DatasetError, TokenizerError, FileNotFoundError)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides, extends=args.student)
        if rank == 0:
            for note in cfg.notes:
                print(f"note: {note}", file=sys.stderr)
        d = cfg.distill
        if d.pseudo_labels and not os.path.isfile(d.pseudo_labels):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError(f"distill.pseudo_labels: {d.pseudo_labels} not found; make it "
                                  f"first with `python -m pix2tex.distill.pseudo_labels --config "
                                  f"{args.config}` (not under torchrun)")
            from pix2tex.distill.pseudo_labels import main as make_labels
            print(f"{d.pseudo_labels} not found: decoding the training set with the teacher "
                  f"(beam width {d.beam_width})", file=sys.stderr)
            make_labels(["--config", args.config, *(["--student", args.student] if args.student
                                                    else []), *args.overrides])
        result = distill(cfg, resume=args.resume, echo=_echo)
        if rank != 0:
            return
        best = "none" if result["best"] is None else f"{result['best']:.4f}"
        print(f"stopped ({result['reason']}) at step {result['step']}; best {result['best_metric']} "
              f"{best}; student exported to {result['student_checkpoint']}")
        data_path = args.eval_data or cfg.valdata
        if args.no_eval or not data_path:
            return
        from pix2tex.eval import prepare_dataset
        from pix2tex.train import setup_runtime
        device = setup_runtime(cfg).device
        dataset = prepare_dataset(Im2LatexDataset.load(data_path), cfg, cfg.testbatchsize)
        tokenizer = load_tokenizer(cfg.tokenizer or dataset.tokenizer_path)
        student = result["student"]
        load_model_weights(student, load_checkpoint(result["student_checkpoint"]))
        results = compare({"teacher": result["teacher"], "student": student}, dataset, tokenizer,
                          device=device, max_batches=args.eval_batches, progress=True)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{data_path} ({results['student']['n']} formulas, greedy):")
    print(markdown_table(results, reference="teacher"))
    out = os.path.join(os.path.dirname(result["student_checkpoint"]), "comparison.json")
    atomic_write_text(out, json.dumps({"data": data_path, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
