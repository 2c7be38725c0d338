"""The one training loop, shared by pretraining and fine-tuning (nanoGPT-style: read it top to
bottom). It owns DDP, sampling, AMP, clipping, the main optimiser and its schedule, atomic
full-state checkpoints with mid-epoch resume, metrics.csv, the validation hook and the live
display; the Objective (train/objectives.py) owns the model and the loss.

Run folder: config.json, metrics.csv, validation.csv, checkpoints/last.pt (whole state),
model.pt (final weights + meta), best.pt (best validation weights + meta).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from mtmim_cli import __version__
from mtmim_cli.allocator import reuse_freed_memory
from mtmim_cli.atomic import atomic_write, atomic_write_text
from mtmim_cli.data.dataset import NORMALISATION, CacheDataset
from mtmim_cli.errors import MtmimError
from mtmim_cli.progress import make_progress
from mtmim_cli.train import distributed as D
from mtmim_cli.train import row_shards
from mtmim_cli.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtmim_cli.train.config import TrainConfig, check_resume_config, write_config
from mtmim_cli.train.loader import TrainLoader, default_workers
from mtmim_cli.train.objectives import Objective

BASE_COLUMNS = ("step", "epoch", "loss", "accuracy", "lr", "images_per_s")

ModelTransform = Callable[[dict[str, Any]], dict[str, Any]]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, cut to whole global batches and dealt to the ranks
    (rank r takes positions r, r+W, ...), so the union of the ranks' k-th batches is the k-th
    global batch a single process would take. `start` skips samples already trained on."""

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int) -> None:
        self.n, self.global_batch, self.world, self.rank, self.seed = n, global_batch, world, rank, seed
        self.steps = n // global_batch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.global_batch]
        return perm[self.rank:: self.world].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world) - self.start


def lr_factor(config: TrainConfig, step: int, total: int, warmup: int | None = None) -> float:
    """Schedule multiplier at `step` (0-based): linear warm-up (`warmup` steps, by default
    config.warmup_steps), then poly/cosine/constant decay. The plateau schedule's drops are
    applied separately (they depend on the loss)."""
    warmup = config.warmup_steps if warmup is None else warmup
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule in ("plateau", "constant"):
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    if config.schedule == "poly":
        return (1.0 - p) ** config.poly_power
    return 0.5 * (1.0 + math.cos(math.pi * p))


# A fine-tune run inside another command's search (orchestration/auto_recipe.py) keeps its
# routine lines (resuming, validation, done) to itself: the search prints one table for all
# of them. Warnings (skipped steps, early stops) still reach the terminal.
_ROUTINE_QUIET: ContextVar[bool] = ContextVar("mtmim_routine_quiet", default=False)


@contextmanager
def routine_messages_off() -> Iterator[None]:
    """Within this block, training prints only its warnings."""
    token = _ROUTINE_QUIET.set(True)
    try:
        yield
    finally:
        _ROUTINE_QUIET.reset(token)


@dataclass
class LoopState:
    """Where the run is; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0                   # 0-based epoch in progress
    position: int = 0                # steps done inside that epoch
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    best_val: float = -1.0
    best_step: int = -1
    skipped: int = 0                 # steps skipped for non-finite gradients, all told
    bad_run: int = 0                 # ... of them in a row, up to now
    saved_step: int = -1             # the step checkpoints/last.pt holds (-1: none yet)
    stopped: bool = False            # early stopping ended the run
    history: list[dict] = field(default_factory=list)   # validation results

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    validations: list[dict]


class _CsvLog:
    """A CSV that survives kills: rows past the resumed step are dropped on reopening."""

    def __init__(self, path: Path, columns: Sequence[str], keep_upto: int | None) -> None:
        self.path, self.columns = path, list(columns)
        header = ",".join(self.columns)
        kept: list[str] = []
        if keep_upto is not None and path.exists():
            lines = path.read_text().splitlines()
            if lines and lines[0] == header:
                for line in lines[1:]:
                    cells = line.split(",")
                    if len(cells) == len(self.columns) and cells[0].isdigit() and int(cells[0]) <= keep_upto:
                        kept.append(line)
        atomic_write_text(path, "\n".join([header, *kept]) + "\n")
        self.fh = open(path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_fmt(row.get(c, "")) for c in self.columns])
        self.fh.write(buf.getvalue())

    def close(self) -> None:
        self.fh.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.8g}"
    return str(v)


def _make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return nullcontext()
    if config.amp == "fp16" and device.type != "cuda":
        raise MtmimError("--amp fp16: needs a CUDA device (use bf16 or none on the CPU)")
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(objective: Objective, train_data: Sequence[str | os.PathLike] | Dataset,
          config: TrainConfig, *, meta: dict[str, Any], validator: Any = None,
          model_transform: ModelTransform | None = None) -> TrainResult:
    """Train `objective` on the caches (or a Dataset) with `config`; returns the run summary.

    `meta` must hold kind, backbone, input_width, embedding_size (plus anything a later
    command needs, e.g. num_classes, age_groups); it is stored in every checkpoint.
    `validator(objective, device) -> {"accuracy", "std", ...}` runs on rank 0 before training,
    every `config.val_every` steps and at the end.
    `model_transform(state) -> state` turns model.pt's {"meta", "objective"} into what
    model.pt holds (fine-tuning's WiSE), in memory, before its one atomic write; last.pt and
    best.pt keep the trained weights.
    """
    config.validate()
    device = D.init_from_env()
    if device.type == "cpu":
        # Each step frees and re-takes its activations' large blocks: keep them mapped
        # (bench/train_allocator.py measures it).
        reuse_freed_memory()
    world = D.world_size()
    meta = {**meta, "normalisation": NORMALISATION, "tool_version": __version__}
    if config.batch_size % (world * config.accumulate):
        raise MtmimError(f"--batch-size {config.batch_size}: must be a multiple of the {world} "
                         f"processes x --accumulate {config.accumulate}")
    if config.keep == "best" and validator is None:
        raise MtmimError("--keep best: needs validation (--val-cache or --val-identities)")
    run_dir = Path(config.out)
    resuming = _open_run_dir(run_dir, config)
    dataset, sampler, total = _make_data(train_data, config, meta)
    run = _Run(objective, config, device, meta, run_dir, validator, resuming, model_transform)
    return run.fit(dataset, sampler, total)


def _open_run_dir(run_dir: Path, config: TrainConfig) -> bool:
    """Decide fresh, resume or refuse, write config.json; returns whether the run resumes.

    Rank 0 decides and tells the others, so a refusal stops every rank instead of leaving
    them waiting at a barrier. Resuming under torchrun assumes the run folder is on a file
    system every rank can read."""
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    problem, resuming = None, False
    if D.rank() == 0:
        try:
            resuming = config.resume and ckpt_path.exists()
            if ckpt_path.exists() and not config.resume:
                raise MtmimError(f"{run_dir}: holds a run already; pass --resume or choose another --out")
            if resuming:
                check_resume_config(run_dir / "config.json", config)
            else:
                # A model.pt left by something else (an earlier search's model equal to the
                # init) must not pass for this run's: a resumed run that finished training
                # keeps the model.pt it finds (fit), so only this run may have written it.
                (run_dir / "model.pt").unlink(missing_ok=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir / "config.json", config)
        except MtmimError as exc:
            problem = str(exc)
    problem, resuming = D.broadcast_object((problem, resuming))
    if problem:
        raise MtmimError(problem)
    return bool(resuming)


def _make_data(train_data: Sequence[str | os.PathLike] | Dataset, config: TrainConfig,
               meta: dict[str, Any]) -> tuple[Dataset, EpochSampler, int]:
    """The dataset, this rank's sampler, and the run's total number of steps."""
    if isinstance(train_data, Dataset):
        dataset = train_data
    else:
        dataset = CacheDataset(train_data, train=True, crop_width=int(meta["input_width"]),
                               seed=config.seed)
    # A dataset may bring its own sampler (e.g. fine-tuning's replay mix); same interface.
    own = getattr(dataset, "make_sampler", None)
    sampler = own(config.batch_size, D.world_size(), D.rank(), config.seed) if own else None
    if sampler is None:
        sampler = EpochSampler(len(dataset), config.batch_size, D.world_size(), D.rank(), config.seed)
    if sampler.steps == 0:
        raise MtmimError(f"training data has {len(dataset)} images, fewer than one batch "
                         f"({config.batch_size}); lower --batch-size")
    total = config.epochs * sampler.steps
    if config.max_steps:
        total = min(total, config.max_steps)
    return dataset, sampler, total


class _Run:
    """One run's moving parts on this rank: the objective (DDP-wrapped when several processes
    train), optimiser, gradient scaler, loop state, logs and display. `fit` drives them."""

    def __init__(self, objective: Objective, config: TrainConfig, device: torch.device,
                 meta: dict[str, Any], run_dir: Path, validator: Any, resuming: bool,
                 model_transform: ModelTransform | None = None) -> None:
        self.objective, self.config, self.device, self.meta = objective, config, device, meta
        self.run_dir, self.validator, self.resuming = run_dir, validator, resuming
        self.world, self.rank = D.world_size(), D.rank()
        self.main = self.rank == 0
        self.local_batch = config.batch_size // self.world
        self.workers = config.workers if config.workers >= 0 else default_workers()
        self.warmup = config.warmup_steps
        self.sharded = bool(row_shards.ddp_ignore_names(objective))   # Partial FC
        self.ckpt_path = run_dir / "checkpoints" / "last.pt"
        self.model_transform = model_transform

        # --- model, optimiser ---
        if self.world > 1 and config.sync_bn:
            D.convert_sync_batchnorm(objective, device)
        objective.to(device)
        groups = objective.main_parameters()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _make_optimizer(config, groups)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.model: nn.Module | None = None    # wrapped at the first step (see _wrap)

        self.st = LoopState()
        if resuming:
            self._load(self.ckpt_path)
        else:
            # Rank-specific streams for dropout and the like; the weights were built before, alike.
            torch.manual_seed(config.seed * 1_000_003 + self.rank)

        keep = self.st.step if resuming else None
        columns = [*BASE_COLUMNS, *objective.metric_names]
        self.log = _CsvLog(run_dir / "metrics.csv", columns, keep) if self.main else None
        self.val_log = (_CsvLog(run_dir / "validation.csv", ["step", "accuracy", "std", "best_accuracy"],
                                keep) if self.main and validator is not None else None)
        self.display = make_progress("img", disable=not (self.main and config.progress))
        self.task: Any = None
        self.last_loss = math.nan

    def _wrap(self) -> nn.Module:
        """The objective as the step calls it: DDP-wrapped when several processes train. DDP
        fixes at construction which parameters it reduces, so the loop wraps again whenever
        the objective changes that set (Objective.begin_step)."""
        if self.world == 1:
            return self.objective
        # Partial FC's class centres differ per rank: DDP must not broadcast or average them.
        ignore = row_shards.ddp_ignore_names(self.objective)
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.objective, ignore)
        return nn.parallel.DistributedDataParallel(
            self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=getattr(self.objective, "ddp_find_unused_parameters", False))

    # --- checkpoints ---
    def _load(self, path: Path) -> None:
        ck = load_checkpoint(path)
        row_shards.load_state(self.objective, self.optimizer, ck["objective"], ck["optimizer"])
        self.objective.load_extra_state_dict(ck.get("extra", {}))
        self.scaler.load_state_dict(ck["scaler"])
        self.st = LoopState(**ck["loop"])
        rngs = ck["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    def last_good(self) -> str:
        """The last full checkpoint written, for error messages."""
        if self.st.saved_step < 0 or not self.ckpt_path.exists():
            return "none written yet"
        return f"{self.ckpt_path} (step {self.st.saved_step})"

    def checkpoint(self, path: Path, full: bool, transform: ModelTransform | None = None) -> None:
        """Weights + meta; `full` adds everything a resume needs (every rank's RNG streams);
        `transform` rewrites the state in memory before the write (model.pt's WiSE).
        Every rank calls it (row-sharded weights are gathered; rank 0 writes). Refuses weights
        that are not finite, so no checkpoint ever holds NaN or inf (the ranks pool what they
        found, so all stop together)."""
        bad = [k for k, v in self.objective.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        bad = sorted(set(sum(D.all_gather_object(bad), [])))   # row-sharded weights differ
        if bad:
            raise MtmimError(f"{self.run_dir}: weights became non-finite ({bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) at step "
                             f"{self.st.step}; stopped without writing {path.name}. "
                             f"Last good checkpoint: {self.last_good()}")
        if full:
            self.st.saved_step = self.st.step
        rngs = D.all_gather_object(rng_state()) if full else None
        weights, opt = row_shards.full_state(self.objective, self.optimizer if full else None)
        if not self.main:
            return
        state: dict[str, Any] = {"meta": self.meta, "objective": weights}
        if full:
            state.update(extra=self.objective.extra_state_dict(), optimizer=opt,
                         scaler=self.scaler.state_dict(), loop=self.st.to_dict(), rng=rngs,
                         config=self.config.to_dict())
        if transform is not None:
            state = transform(state)
        save_checkpoint(path, state)

    # --- output ---
    def say(self, msg: str, routine: bool = False) -> None:
        if self.main and not (routine and _ROUTINE_QUIET.get()):
            console = self.display.console
            console.print(msg, highlight=False)
            console.file.flush()   # reach a redirected log now, not when the buffer fills

    def validate(self) -> None:
        """Every rank scores its share of the validation images (the validator gathers the
        features), so no rank waits idle at a collective for as long as a whole validation
        takes; all get the same result, keep the same history (it is in every checkpoint)
        and join the best.pt checkpoint."""
        st, validator = self.st, self.validator
        if validator is None:
            return
        # the ranks' BatchNorm statistics drift apart between DDP's broadcasts: score rank 0's
        D.broadcast_buffers(self.objective, skip=row_shards.ddp_ignore_names(self.objective))
        res = validator(self.objective, self.device)
        acc, std = float(res["accuracy"]), float(res["std"])
        improved = acc > st.best_val
        if improved:
            st.best_val, st.best_step = acc, st.step
            self.checkpoint(self.run_dir / "best.pt", full=False)
        st.history.append({"step": st.step, "accuracy": acc, "std": std})
        if self.val_log is not None:
            self.val_log.write({"step": st.step, "accuracy": acc, "std": std,
                                "best_accuracy": st.best_val})
        self.say(f"validation at step {st.step} on {getattr(validator, 'name', 'pairs')}: "
                 f"accuracy {acc:.4f} ± {std:.4f} (best {st.best_val:.4f} at step {st.best_step})",
                 routine=True)
        since = sum(h["step"] > st.best_step for h in st.history)
        if self.config.early_stop and since >= self.config.early_stop:
            st.stopped = True
            self.say(f"early stop: {since} validations without a better accuracy than "
                     f"{st.best_val:.4f} (step {st.best_step})")

    # --- training ---
    def fit(self, dataset: Dataset, sampler: EpochSampler, total: int) -> TrainResult:
        """Run epochs until `total` steps, validate at the end, write last.pt and model.pt."""
        st, config = self.st, self.config
        if not config.warmup_steps and config.warmup_epochs:
            self.warmup = round(config.warmup_epochs * sampler.steps)
        model_path = self.run_dir / "model.pt"
        # A resumed run whose training had ended wrote model.pt after its final last.pt (a
        # fresh run removes any older model.pt): keep it, never rewrite a finished model.
        # Rank 0 looks, so every rank takes the same path through the collective checkpoint.
        kept = D.broadcast_object(self.resuming and (st.stopped or st.step >= total)
                                  and self.main and model_path.exists())
        if self.resuming:
            self.say(f"resuming {self.run_dir} at step {st.step} (epoch {st.epoch + 1}, "
                     f"batch {st.position})", routine=True)
        elif self.validator is not None:
            self.validate()
        self.objective.train()
        self.loader = TrainLoader(dataset, sampler, self.local_batch, self.workers,
                                  self.device.type == "cuda", config.seed)
        try:
            with self.display:
                self.task = self.display.add_task("train", total=total * config.batch_size,
                                                  completed=st.step * config.batch_size)
                while st.step < total and not st.stopped:
                    if st.position >= sampler.steps:     # an epoch just ended
                        _end_epoch(st, config, self.optimizer, self.objective, self.say)
                        self.checkpoint(self.ckpt_path, full=True)
                        continue
                    self._run_epoch(total)
                    if st.step >= total and st.position >= sampler.steps:
                        _end_epoch(st, config, self.optimizer, self.objective, self.say)
            if self.validator is not None and not (st.history and st.history[-1]["step"] == st.step):
                self.validate()
            self.checkpoint(self.ckpt_path, full=True)   # holds the final validation history too
            best = self.run_dir / "best.pt"
            if kept:
                self.say(f"{model_path}: written when this run finished; kept as it is", routine=True)
            elif config.keep == "best" and best.exists():
                if self.main:
                    self._model_from_best(best, model_path)
                self.say(f"model.pt: the best validation checkpoint (step {st.best_step}, "
                         f"accuracy {st.best_val:.4f})", routine=True)
            else:
                self.checkpoint(model_path, full=False, transform=self.model_transform)
        finally:
            self.loader.close()
            for log in (self.log, self.val_log):
                if log is not None:
                    log.close()
        skipped = f" ({st.skipped} skipped for non-finite gradients)" if st.skipped else ""
        self.say(f"done: {st.step} steps{skipped}, last loss {self.last_loss:.4f}; "
                 f"weights in {self.run_dir / 'model.pt'}", routine=True)
        return TrainResult(self.run_dir, st.step, self.last_loss, list(st.history))

    def _model_from_best(self, best: Path, model_path: Path) -> None:
        """model.pt from best.pt: a copy, or best.pt's state through the transform."""
        if self.model_transform is None:
            with atomic_write(model_path) as tmp:
                shutil.copyfile(best, tmp)
        else:
            save_checkpoint(model_path, self.model_transform(load_checkpoint(best)))

    def _run_epoch(self, total: int) -> None:
        """Train from the current position to the end of the epoch (or of the run)."""
        st, config = self.st, self.config
        t0 = time.perf_counter()
        for images, labels, ages, _ in self.loader.epoch(st.epoch, st.position * self.local_batch):
            if st.step >= total:
                break
            row = self._step(images, labels, ages, total)
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            row["images_per_s"] = config.batch_size / max(dt, 1e-9)
            if self.log is not None and st.step % config.log_every == 0:
                self.log.write(row)
            self.display.update(self.task, advance=config.batch_size,
                                description=f"epoch {st.epoch + 1} loss {row['loss']:.3f} "
                                            f"acc {row['accuracy']:.3f}")
            # Validate before checkpointing, so a checkpoint at this step holds the
            # result and a resumed run neither repeats nor loses it.
            if config.val_every and st.step % config.val_every == 0 and st.step < total:
                self.validate()
                t0 = time.perf_counter()   # images/s measures training, not validation
                if st.stopped:
                    break
            if config.ckpt_every and st.step % config.ckpt_every == 0:
                self.checkpoint(self.ckpt_path, full=True)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, ages: torch.Tensor,
              total: int) -> dict[str, Any]:
        """One optimiser step on a batch; returns its metrics row (averaged over ranks)."""
        st, config, optimizer, device = self.st, self.config, self.optimizer, self.device
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(config, st.step, total, self.warmup) * st.plateau_scale
        if self.objective.begin_step(st.step) or self.model is None:
            self.model = self._wrap()
        n = config.accumulate
        optimizer.zero_grad(set_to_none=True)
        rows, names = [], ["accuracy"]
        # --accumulate N: N micro-batches, gradients summed (each loss / N), one optimiser
        # step; DDP reduces the gradients once, on the last backward (no_sync before it).
        for k, (x, y, a) in enumerate(zip(images.chunk(n), labels.chunk(n), ages.chunk(n),
                                          strict=True)):
            quiet = self.world > 1 and k < n - 1
            with self.model.no_sync() if quiet else nullcontext():
                with _autocast(config, device):
                    loss, metrics = self.model(x.to(device, non_blocking=True),
                                               y.to(device, non_blocking=True),
                                               a.to(device, dtype=torch.float32, non_blocking=True))
                self.scaler.scale(loss / n).backward()
            names = ["accuracy", *[m for m in self.objective.metric_names if m in metrics]]
            rows.append(torch.stack([loss.detach().float(),
                                     *[metrics[m].detach().float().reshape(()) for m in names]]))
        micro = torch.stack(rows)
        vals = torch.cat([micro[:, :1].mean(0), micro[:, 1:].nanmean(0)])
        vals = (D.all_reduce_sum(vals) / self.world).tolist()
        if not math.isfinite(vals[0]):
            raise MtmimError(f"{self.run_dir}: loss is {vals[0]} at step {st.step + 1} "
                             f"(epoch {st.epoch + 1}); stopped. Last good checkpoint: {self.last_good()}")
        self.scaler.unscale_(optimizer)     # a no-op without fp16
        # A finite loss can still have non-finite gradients (an overflow in backward, a bad
        # op): such a step is skipped, never applied (the forward's BatchNorm statistics stay;
        # checkpoint() catches them if they are not finite). Under DDP the gradients are
        # already all-reduced, so every rank takes the same decision.
        finite = _grads_finite(self.params)
        if self.world > 1 and self.sharded:
            # Partial FC's centre gradients stay on their rank: decide together
            finite = bool(D.all_reduce_sum(torch.tensor([float(not finite)], device=device)) == 0)
        if finite:
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.params, config.clip_grad)
            self.scaler.step(optimizer)
        self.scaler.update()                # under fp16 a skipped step also lowers the loss scale
        inner = self.objective.after_step() if finite else {}
        if finite:
            st.bad_run = 0
        else:
            st.skipped += 1
            st.bad_run += 1
            self.say(f"step {st.step + 1}: non-finite gradients with a finite loss; step skipped "
                     f"({st.bad_run} in a row, {st.skipped} in all)")
            if st.bad_run >= config.max_bad_steps:
                raise MtmimError(f"{self.run_dir}: {st.bad_run} steps in a row with non-finite "
                                 f"gradients (up to step {st.step + 1}); stopped. Last good "
                                 f"checkpoint: {self.last_good()}")
        st.step += 1
        st.position += 1
        self.last_loss = vals[0]
        st.epoch_loss_sum += vals[0]
        st.epoch_loss_n += 1
        row = dict(zip(["loss", *names], vals, strict=True))
        row.update(inner)
        row.update(step=st.step, epoch=st.epoch + 1, lr=optimizer.param_groups[0]["lr"])
        return row


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _end_epoch(st: LoopState, config: TrainConfig, optimizer: torch.optim.Optimizer,
               objective: Objective, say) -> None:
    """Close the epoch: the plateau rule looks at the epoch's mean loss."""
    mean = st.epoch_loss_sum / max(1, st.epoch_loss_n)
    if config.schedule == "plateau" and st.epoch_loss_n:
        if mean < st.plateau_best * (1 - config.plateau_threshold):
            st.plateau_best, st.plateau_bad = mean, 0
        else:
            st.plateau_bad += 1
            if st.plateau_bad >= config.plateau_patience:
                st.plateau_scale *= config.plateau_factor
                st.plateau_bad = 0
                if hasattr(objective, "on_lr_drop"):
                    objective.on_lr_drop(config.plateau_factor)
                say(f"epoch {st.epoch + 1}: loss {mean:.4f} did not improve; lr x{config.plateau_factor}")
    st.epoch += 1
    st.position = 0
    st.epoch_loss_sum, st.epoch_loss_n = 0.0, 0
