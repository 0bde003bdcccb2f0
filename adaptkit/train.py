"""The training loop: one process, or several under torchrun (DDP, or FSDP with train.strategy fsdp).

Read it top to bottom: :func:`fit` builds the optimizer and schedule, restores a
checkpoint when resuming, then runs optimizer steps over seeded, sharded global
batches, evaluating and checkpointing on schedule. Everything random (order,
augmentation, dropout) is seeded so a run, its resumed twin and its DDP twin agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.blocks import checkpoint_blocks, compile_blocks
from adaptkit.capabilities import KeepsTrainingState
from adaptkit.checkpoint import first_non_finite, load_tensors, save_tensors
from adaptkit.data import BatchDataset, DataBundle, LoaderOptions, PlannedLoader, SequentialPlan, to_device
from adaptkit.deferred import fill_whole, is_deferred
from adaptkit.distributed import DistInfo, full_tensor, like, local_numel, shard_model, unsharded_root
from adaptkit.errors import CheckpointError, RunError
from adaptkit.precision import compute_context
from adaptkit.records import RunInfo
from adaptkit.spec import TrainSpec
from adaptkit.task import TaskModel

STATE_FILE = "checkpoint/state.safetensors"


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    #: unreadable samples skipped while training (replaced by the next readable ones), over all processes
    skipped: int = 0
    #: the trained tensors, whole (gathered from every process under fsdp), by parameter name: what the adapter file holds
    trained: dict[str, torch.Tensor] = field(default_factory=dict)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + stream) % (2**63 - 1))


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (the same on every process)."""
    return torch.randperm(size, generator=_generator(seed, epoch, 0))


def epoch_randomness(size: int, dims: int, seed: int, epoch: int) -> torch.Tensor:
    """Per-sample uniform numbers for augmentation in one epoch (the same on every process)."""
    return torch.rand(size, dims, generator=_generator(seed, epoch, 1))


def epoch_seed_base(seed: int, epoch: int) -> int:
    """Sample ``i`` of an epoch seeds its augmentation with ``base + i`` (the same on every process)."""
    return int(torch.randint(0, 2**62, (1,), generator=_generator(seed, epoch, 2)).item())


class TrainPlan:
    """Which samples every micro-batch of every optimizer step reads, from ``start`` on.

    A pure function of the seed, epoch and step: the loader iterates it to hand batches to
    its workers, and the loop iterates :meth:`steps` to know how many micro-batches each step
    has, so a resumed run picks up at the same sample and each process reads its own part of
    every global batch.
    """

    def __init__(self, size: int, batch_size: int, accum: int, steps_per_epoch: int, start: int, total: int,
                 seed: int, dist: DistInfo, augment_dims: int) -> None:
        self.size, self.batch_size, self.accum, self.steps_per_epoch = size, batch_size, accum, steps_per_epoch
        self.start, self.total, self.seed, self.dist, self.augment_dims = start, total, seed, dist, augment_dims

    def steps(self) -> Any:
        """(step, global batch size, [(indices, seeds, rand), ...] of this process's micro-batches)."""
        cached_epoch, order, rand, base = -1, None, None, 0
        for step in range(self.start, self.total):
            epoch, index_in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                order = epoch_order(self.size, self.seed, epoch)
                rand = epoch_randomness(self.size, self.augment_dims, self.seed, epoch) if self.augment_dims else None
                base = epoch_seed_base(self.seed, epoch)
                cached_epoch = epoch
            indices = order[index_in_epoch * self.batch_size : (index_in_epoch + 1) * self.batch_size]
            mine = torch.tensor_split(indices, self.dist.world)[self.dist.rank]
            micros = [
                (m.tolist(), (m + base).tolist(), rand[m] if rand is not None else None)
                for m in torch.tensor_split(mine, self.accum) if len(m)
            ]
            yield step, len(indices), micros

    def __iter__(self) -> Any:
        for _, _, micros in self.steps():
            yield from micros


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and tokens; never biases or norm scales (ndim < 2)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass
class _Progress:
    """The loop's running counters: the step reached, the loss since the last evaluation, time."""

    step: int
    loss_sum: float
    loss_count: int
    elapsed_before: float  # seconds trained before this process started (a resumed run)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def stepped(self, step_loss: float, local_count: int, global_count: int) -> int:
        """Count one optimizer step; returns the number of steps done."""
        self.step += 1
        self.loss_sum += step_loss
        self.loss_count += local_count
        self.samples += global_count
        return self.step

    def rate(self) -> float:
        """Samples per second since this process started training."""
        return self.samples / max(1e-9, time.perf_counter() - self.started)

    def seconds(self) -> float:
        """Seconds trained, a resumed run's earlier ones included."""
        return self.elapsed_before + time.perf_counter() - self.started


class Trainer:
    """Trains a task model on a data bundle as a :class:`TrainSpec` says."""

    def __init__(
        self,
        model: TaskModel,
        data: DataBundle,
        train: TrainSpec,
        *,
        seed: int,
        lr: float,
        weight_decay: float,
        output_dir: Path,
        device: torch.device,
        dist: DistInfo,
        spec_fingerprint: str = "",
        log: Callable[[str], None] = print,
        loader: LoaderOptions | None = None,
        spec: Any = None,
        registry: Any = None,
        saved: SavedState | None = None,
    ) -> None:
        if data.train is None or len(data.train) == 0:
            raise RunError("the data source has no training samples")
        self.model, self.data, self.cfg = model, data, train
        self.seed, self.lr, self.weight_decay = seed, lr, weight_decay
        self.output_dir, self.device, self.dist = output_dir, device, dist
        self.spec_fingerprint, self.log = spec_fingerprint, log
        if registry is None:
            from adaptkit.registry import registry as default_registry

            registry = default_registry()
        self.spec, self.registry = spec, registry
        #: the checkpoint to resume from, already read by check_resumable (None: read it when resuming)
        self.saved = saved
        #: the experiment loggers the lifecycle hooks reach besides every plugin's own hooks
        self.loggers = list(train.loggers if train.loggers is not None else registry.default_loggers)
        n = len(data.train)
        self.steps_per_epoch = math.ceil(n / train.batch_size)
        self.total_steps = train.max_steps or train.epochs * self.steps_per_epoch
        self.eval_every = train.eval_every or self.steps_per_epoch
        self.checkpoint_every = train.checkpoint_every or self.eval_every
        self.warmup = int(train.warmup if train.warmup >= 1 else round(train.warmup * self.total_steps))
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.fsdp = False  # set by fit: train.strategy fsdp under torchrun
        self.loader_options = loader or LoaderOptions()
        self._eval_loaders: dict[str, PlannedLoader] = {}

    # ----------------------------------------------------------------- setup
    def _optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.weight_decay)
        for group in groups:
            group["initial_lr"] = self.lr
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.cfg.betas)

    def _autocast(self) -> Any:
        return compute_context(self.model, self.device.type, self.cfg.precision)

    # ----------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train ``total_steps`` optimizer steps (from the last checkpoint when resuming),
        evaluating and checkpointing as the spec says; the lifecycle hooks observe it."""
        model = self._prepare_model()
        optimizer = self._optimizer()
        result, progress = self._start_or_resume(optimizer)
        engine = self._engine(model)
        plan = TrainPlan(len(self.data.train), self.cfg.batch_size, self.cfg.grad_accum, self.steps_per_epoch, progress.step,
                         self.total_steps, self.seed, self.dist, self.data.augment_dims if self.data.augment else 0)
        loader = PlannedLoader(self.data.train, plan, self.loader_options, self.data.augment)
        batches = iter(loader)
        run = RunInfo(self.spec, self.output_dir, self.total_steps, progress.step, result.history, model.primary_metric, self.log,
                      train=self.cfg)
        progress.started = time.perf_counter()
        with self._observed(run):
            for step, global_count, micro_batches in plan.steps():
                lr = self.lr * lr_factor(step, self.total_steps, self.warmup, self.cfg.schedule, self.cfg.min_lr_ratio)
                step_loss, local_count = self._optimizer_step(engine, optimizer, batches, micro_batches, global_count, lr)
                model.after_optimizer_step(step + 1)
                done = progress.stepped(step_loss, local_count, global_count)
                self._hook("adaptkit_train_step", run=run, step=done,
                           logs={"loss": step_loss / max(1, local_count), "lr": lr, "samples_per_second": progress.rate()})
                if not math.isfinite(step_loss):
                    raise RunError(f"the training loss became {step_loss} at step {done}; lower train.lr or enable train.grad_clip")
                if done % self.eval_every == 0 or done == self.total_steps:
                    record = self._evaluate_and_record(done, lr, progress, result)
                    self._hook("adaptkit_evaluate", run=run, step=done, record=record)
                if done % self.checkpoint_every == 0 or done == self.total_steps:
                    result.skipped = self._skipped_total(loader.skipped)
                    if self.dist.main or self.fsdp:  # under fsdp every process gathers its shards; rank 0 writes
                        self._save_state(optimizer, done, result.history, progress.loss_sum, progress.loss_count,
                                         progress.seconds(), result.skipped)
        return self._finish(model, result, progress)

    # ----------------------------------------------------------------- the parts of fit
    def _prepare_model(self) -> TaskModel:
        """The model on its device in train mode, sharded under fsdp."""
        self.fsdp = self.cfg.strategy == "fsdp" and self.dist.enabled
        model = self.model
        if not self.fsdp:
            fill_whole(model)  # a model built with its base on the meta device, trained unsharded after all
        if not is_deferred(model):  # (a deferred base reaches the device shard by shard)
            model = model.to(self.device)
        model.train()
        if self.cfg.gradient_checkpointing:
            checkpoint_blocks(model)
        if self.cfg.compile:
            compile_blocks(model)
        if self.cfg.strategy == "fsdp" and not self.dist.enabled:
            self.log("train.strategy is fsdp but this is one process (not launched with torchrun): nothing to shard, training as a plain loop")
        if self.fsdp:  # (a task's EMA copies of the trained tensors are made from them, sharded alike)
            units = shard_model(model, self.device, self.dist)
            if self.dist.main:
                built = model.adaptkit.base_build or "every process built the whole model"
                self.log(f"fsdp: {units} blocks and the root sharded over {self.dist.world} processes; {built}; "
                         f"process 0 holds {local_numel(model):,} of {sum(p.numel() for p in model.parameters()):,} parameter values")
        # sharding (and filling in a deferred base) replaces parameters with new ones of the same names
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return model

    def _start_or_resume(self, optimizer: torch.optim.Optimizer) -> tuple[TrainResult, _Progress]:
        """A fresh result and counters, or those of the last checkpoint when ``train.resume`` finds one."""
        result, progress = TrainResult(), _Progress(0, 0.0, 0, 0.0)
        self.skipped_before = 0
        if self.cfg.resume:
            restored = self._restore(optimizer)
            if restored is not None:
                start_step, result.history, loss_sum, loss_count, elapsed, skipped = restored
                progress = _Progress(start_step, loss_sum, loss_count, elapsed)
                self.skipped_before = skipped if self.dist.main else 0  # a global count: added once, by rank 0
                result.resumed_from = start_step
                if self.dist.main:
                    self.log(f"resuming at step {start_step} of {self.total_steps}")
        return result, progress

    def _engine(self, model: nn.Module) -> nn.Module:
        """What the steps call: the model, or its DDP wrapper under torchrun (fsdp shards in place)."""
        if not self.dist.enabled or self.fsdp:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=model.ddp_find_unused_parameters)

    def _optimizer_step(self, engine: nn.Module, optimizer: torch.optim.Optimizer, batches: Any, micro_batches: list[Any],
                        global_count: int, lr: float) -> tuple[float, int]:
        """One optimizer step over this process's micro-batches; returns (summed loss, samples)."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for k in range(len(micro_batches)):
            batch = to_device(next(batches), self.device)
            sync = k == len(micro_batches) - 1
            if self.fsdp:
                engine.set_requires_gradient_sync(sync)  # reduce-scatter gradients on the last micro-batch only
                context = _null()
            else:
                context = engine.no_sync() if (self.dist.enabled and not sync) else _null()
            with context:
                with self._autocast():
                    out = engine(batch)
                # weight by share of the global batch: DDP's mean over ranks then gives the global mean
                loss = out.loss.float() * (out.count * self.dist.world / global_count)
                loss.backward()
            step_loss += out.loss.item() * out.count
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, sum(len(m[0]) for m in micro_batches)

    def _evaluate_and_record(self, done: int, lr: float, progress: _Progress, result: TrainResult) -> dict[str, Any]:
        """Evaluate on val and add the history record (step, epoch, lr, train_loss, val_*)."""
        metrics = self.evaluate("val")
        record = {
            "step": done,
            "epoch": round(done / self.steps_per_epoch, 4),
            "lr": lr,
            "train_loss": progress.loss_sum / max(1, progress.loss_count),
            **{f"val_{k}": v for k, v in TaskModel.scalar_metrics(metrics).items()},
        }
        progress.loss_sum, progress.loss_count = 0.0, 0
        result.history.append(record)
        return record

    def _finish(self, model: TaskModel, result: TrainResult, progress: _Progress) -> TrainResult:
        """After the last step: the task's final weights (EMA), and the trained tensors whole (gathered
        under fsdp, where the base stays sharded for the final evaluation) and checked."""
        if result.skipped and self.dist.main:
            self.log(f"data: skipped {result.skipped} unreadable training samples (each replaced by the next readable one)")
        if isinstance(model, KeepsTrainingState):
            model.finish_training()
        # whole tensors of what trained only (gathered from the shards under fsdp, collectively): the base stays sharded
        result.trained = {name: full_tensor(p.detach()) for name, p in self.trainable}
        check_finite_state(result.trained, self.total_steps)
        result.steps = self.total_steps
        result.seconds = progress.seconds()
        return result

    @contextlib.contextmanager
    def _observed(self, run: RunInfo) -> Iterator[None]:
        """The spec's loggers registered, and the start and end hooks called, around the loop (main process)."""
        if not self.dist.main:
            yield
            return
        with self.registry.observing(run, self.loggers):
            self._hook("adaptkit_train_start", run=run)
            try:
                yield
            except BaseException:
                self._hook("adaptkit_train_end", run=run, status="failed")
                raise
            self._hook("adaptkit_train_end", run=run, status="finished")

    def _hook(self, name: str, **arguments: Any) -> None:
        if self.dist.main:
            self.registry.call_lifecycle(name, **arguments)

    def _skipped_total(self, mine: int) -> int:
        """Skipped training samples so far, summed over processes (collective under torchrun)."""
        count = torch.tensor([self.skipped_before + mine], dtype=torch.long)
        if self.dist.enabled:
            import torch.distributed as dist

            count = count.to(self.device)
            dist.all_reduce(count)
        return int(count.item())

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics of the task on a split (every process evaluates the whole split); the
        split's loader (and with persistent workers, its worker processes) is kept for the next time."""
        dataset = getattr(self.data, split)
        if dataset is None or len(dataset) == 0:
            return {}
        with unsharded_root(self.model):
            return evaluate(self.model, dataset, 0, self.device, self._autocast, loader=self.eval_loader(split))

    def eval_loader(self, split: str) -> PlannedLoader | None:
        """The loader of a split's evaluations (made once: persistent workers serve every evaluation)."""
        dataset = getattr(self.data, split)
        if dataset is None or len(dataset) == 0:
            return None
        if split not in self._eval_loaders:
            plan = SequentialPlan(len(dataset), self.cfg.eval_batch_size or self.cfg.batch_size)
            self._eval_loaders[split] = PlannedLoader(dataset, plan, self.loader_options)
        return self._eval_loaders[split]

    # ----------------------------------------------------------------- state
    def _save_state(self, optimizer: torch.optim.Optimizer, step: int, history: list[dict[str, Any]], loss_sum: float, loss_count: int,
                    elapsed: float, skipped: int = 0) -> None:
        # whole tensors: under fsdp every process takes part in gathering the shards, in the same order
        tensors: dict[str, torch.Tensor] = {f"param.{name}": full_tensor(p.detach()) for name, p in self.trainable}
        for i, (_, p) in enumerate(self.trainable):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    value = full_tensor(value)
                    tensors[f"optim.{i}.{key}"] = value.reshape(value.shape) if value.ndim else value.reshape(1)
        if isinstance(self.model, KeepsTrainingState):
            tensors.update({f"task.{name}": full_tensor(t) for name, t in self.model.extra_state().items()})
        check_finite_state(tensors, step)  # whole tensors on every process; the last good checkpoint stays
        if not self.dist.main:
            return
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        metadata = {
            "step": step,
            "history": history,
            "loss_sum": loss_sum,
            "loss_count": loss_count,
            "elapsed": elapsed,
            "spec_fingerprint": self.spec_fingerprint,
            "skipped": skipped,
            "param_names": [name for name, _ in self.trainable],
        }
        save_tensors(self.output_dir / STATE_FILE, tensors, metadata)

    def _restore(self, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]], float, int, float, int] | None:
        path = self.output_dir / STATE_FILE
        saved = self.saved if self.saved is not None and self.saved.path == path else read_state(path)
        self.saved = None  # (its tensors are not kept past the restore)
        if saved is None:
            return None
        tensors, meta = saved.tensors, saved.meta
        if meta["spec_fingerprint"] and self.spec_fingerprint and meta["spec_fingerprint"] != self.spec_fingerprint:
            raise CheckpointError(
                f"{path}: the checkpoint belongs to a different spec; resume with the spec that started the run, "
                "or choose another output.dir"
            )
        names = meta["param_names"]
        if names != [name for name, _ in self.trainable]:
            raise CheckpointError(f"{path}: the checkpoint's trainable tensors differ from this model's")
        lacking = [key for key in [*(f"param.{name}" for name in names), "rng.torch"] if key not in tensors]
        if lacking:
            raise CheckpointError(f"{path}: the checkpoint lacks {lacking[0]}; it is damaged (start again with --overwrite)")
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(like(tensors[f"param.{name}"], p))
        # prime AdamW's state with the saved moments
        for i, (_, p) in enumerate(self.trainable):
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                saved = tensors.get(f"optim.{i}.{key}")
                if saved is not None:
                    state[key] = saved.reshape(()) if key == "step" else like(saved, p)
            if state:
                optimizer.state[p] = state
        extra = {name[len("task."):]: t.to(self.device) for name, t in tensors.items() if name.startswith("task.")}
        if extra and isinstance(self.model, KeepsTrainingState):  # (whole: under fsdp the task places them as its parameters)
            self.model.load_extra_state(extra)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        return meta["step"], meta["history"], meta["loss_sum"], meta["loss_count"], meta["elapsed"], meta["skipped"]



# ----------------------------------------------------------------- checks
#: what a checkpoint's metadata holds: how each value is read back, and what it must then be
_STATE_KEYS: dict[str, tuple[Callable[[str], Any], type]] = {
    "step": (int, int), "history": (json.loads, list), "loss_sum": (float, float), "loss_count": (int, int),
    "elapsed": (float, float), "param_names": (json.loads, list), "skipped": (int, int),
}
#: keys older checkpoints lack, and the value they stand for
_STATE_DEFAULTS = {"skipped": "0"}


def state_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """The parsed metadata of a checkpoint (step, history, ...); a :class:`CheckpointError` naming a damaged key."""
    meta: dict[str, Any] = {"spec_fingerprint": raw.get("spec_fingerprint", "")}
    raw = {**_STATE_DEFAULTS, **raw}
    for key, (read, kind) in _STATE_KEYS.items():
        if key not in raw:
            raise CheckpointError(f"{path}: the checkpoint's metadata lacks '{key}'; it is damaged (start again with --overwrite)")
        try:
            value = read(raw[key])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, kind) or (kind is not list and not math.isfinite(value)) or (key in ("step", "skipped") and value < 0):
            raise CheckpointError(f"{path}: the checkpoint's metadata '{key}' is damaged ({raw[key][:60]!r}); start again with --overwrite")
        meta[key] = value
    if not all(isinstance(record, dict) for record in meta["history"]):
        raise CheckpointError(f"{path}: the checkpoint's metadata 'history' is damaged; start again with --overwrite")
    return meta


@dataclass
class SavedState:
    """A training checkpoint, read and verified: its tensors and parsed metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def read_state(path: Path) -> SavedState | None:
    """The checkpoint at ``path`` read and verified (hash, finite values, metadata), or None when there is none."""
    if not path.exists():
        return None
    tensors, raw = load_tensors(path)
    return SavedState(path, tensors, state_metadata(raw, path))


def check_resumable(path: Path) -> SavedState | None:
    """Refuse a checkpoint that cannot be resumed (damaged file or metadata) before anything is written; none is fine.
    Returns what it read, for ``Trainer(saved=...)`` to restore from without reading the file again."""
    return read_state(path)


def check_finite_state(tensors: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to keep trained tensors holding NaN or infinity: a :class:`RunError` naming the step and a tensor."""
    name = first_non_finite({key: tensor.detach() for key, tensor in tensors.items()})
    if name is not None:
        raise RunError(
            f"the trained tensors became NaN or infinite at step {step} (e.g. {name}); nothing was saved from that "
            "step, the last good checkpoint is kept. Lower train.lr or enable train.grad_clip"
        )


@torch.no_grad()
def evaluate(
    model: TaskModel,
    dataset: BatchDataset,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any] | None = None,
    options: LoaderOptions | None = None,
    loader: PlannedLoader | None = None,
) -> dict[str, Any]:
    """Run a task's evaluation over a dataset, in eval mode, then restore the mode.

    Batches come from ``loader``, or a new one over ``dataset`` in order (``options``: workers).
    Samples it skipped as unreadable are added to the metrics as ``skipped``.
    """
    was_training = model.training
    model.eval()
    loader = loader or PlannedLoader(dataset, SequentialPlan(len(dataset), batch_size), options or LoaderOptions())
    before = loader.skipped
    try:
        with autocast() if autocast else _null():
            metrics = model.evaluate(to_device(b, device) for b in loader)
    finally:
        model.train(was_training)
    if loader.skipped > before and isinstance(metrics, dict):
        metrics["skipped"] = loader.skipped - before
    return metrics


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None
