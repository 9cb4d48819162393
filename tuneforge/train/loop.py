"""The shared training loop: one optimizer step = one global batch, however it is split.

Every recipe but PPO trains through :func:`train`; its run folder, resume, checkpoints, logging
and early stopping are the run lifecycle's (train/lifecycle.py), which PPO's loop drives too.
What the step guarantees:

- **Deterministic data order.** Epoch ``e`` visits the examples in a permutation seeded by
  ``(seed, e)``; optimizer step ``k`` takes the next ``global_batch`` examples of that stream.
  A resumed run therefore sees exactly the batches an uninterrupted run would have.
- **Token-normalised accumulation.** The loss of a step is the sum of token losses over the
  whole global batch divided by its number of trained tokens, no matter how it is split into
  micro-batches or processes: batch 1 x accumulation 4 gives the same update as batch 4 x 1,
  and 2 processes x batch 2 the same as 1 x batch 4.
- **Scale-out through accelerate.** Run plainly for one process, or under
  ``accelerate launch`` for DDP/FSDP; gradients are averaged by the engine, so each process
  scales its share by the world size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from tuneforge.config import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import base_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.train.compile import CompiledLayers, compiled_layers, use_compile
from tuneforge.train.lifecycle import EvalHook, RunLifecycle, TrainResult
from tuneforge.train.memory import release_free_memory
from tuneforge.train.objectives import CausalLMObjective, Objective

MetricsFn = Callable[[torch.nn.Module], dict[str, float]]

def make_accelerator(cfg: TrainConfig | None = None, model: torch.nn.Module | None = None) -> Accelerator:
    """An Accelerator for this machine, launcher and ``train.distributed`` choice.

    Without a GPU, accelerate only joins processes started by torchrun / ``accelerate launch``
    into one (gloo) group when told it is on the CPU, so say so; with a GPU, let it choose.
    FSDP shards each transformer layer (FSDP2); accelerate applies it on GPUs only.
    """
    if cfg is None or cfg.distributed == "ddp":
        return Accelerator(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        raise ConfigError("train.distributed=fsdp needs GPUs (accelerate shards only on GPUs); "
                          "use train.distributed=ddp on the CPU")
    from accelerate.utils import FullyShardedDataParallelPlugin

    layer_classes = sorted({type(m).__name__ for m in model.modules()
                            if type(m).__name__.endswith("DecoderLayer")}) if model else None
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=layer_classes, state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True)
    return Accelerator(fsdp_plugin=plugin)


def use_bf16(setting: str, device: torch.device) -> bool:
    """Resolve ``train.bf16``: auto means wherever the hardware has native bf16 matmuls."""
    if setting != "auto":
        return setting == "true"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, global_batch: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Example indices of each optimizer step, from ``start_step`` on (an endless stream)."""
    step = 0
    position = 0  # in the concatenation of epoch permutations
    epoch, order = 0, epoch_order(n, seed, 0)
    while True:
        batch = []
        while len(batch) < global_batch:
            offset = position - epoch * n
            if offset >= n:
                epoch += 1
                order = epoch_order(n, seed, epoch)
                continue
            take = min(global_batch - len(batch), n - offset)
            batch.extend(order[offset : offset + take])
            position += take
        if step >= start_step:
            yield batch
        step += 1


def total_steps(n: int, cfg: TrainConfig, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n / (cfg.batch_size * cfg.grad_accum * world)))


def lr_lambda(cfg: TrainConfig, steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable weights only; no weight decay on norms and biases (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def train(
    model: torch.nn.Module,
    train_set: list,
    val_set: list,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    objective: Objective | None = None,
    metrics_fn: MetricsFn | None = None,
    on_eval: EvalHook | None = None,
) -> TrainResult:
    """Train ``model`` in place; writes metrics.jsonl and checkpoints/ under ``run_dir``.

    ``objective`` turns micro-batches of ``train_set``/``val_set`` items into a loss (default:
    next-token loss on tokenized examples). ``metrics_fn(model)``, if given, runs at each
    validation and its results are logged as ``val_<name>``; ``cfg.metric_for_best`` picks
    the validation figure that decides the best checkpoint and early stopping. ``on_eval``
    (default: the one set by :func:`eval_hook`) sees each validation's metrics and may stop
    the run.
    """
    acc = accelerator or make_accelerator()
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(cfg.seed + rank)
    steps = total_steps(len(train_set), cfg, world)
    bf16 = use_bf16(cfg.bf16, acc.device)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    use_packed_attention(model)  # per-example attention inside packed rows
    objective = objective or CausalLMObjective(model)
    # compiled layers run only inside the loop's loss computations (see train/compile.py)
    layers = None
    if use_compile(cfg.compile, acc.device, objective.module, steps,
                   auto=getattr(objective, "compile_auto", True)):
        layers = CompiledLayers(objective.module)
        if acc.is_main_process:
            print("tuneforge: decoder layers compiled with torch.compile (train.compile); the first "
                  "step includes the compilation", file=sys.stderr, flush=True)

    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    wrapper, optimizer = acc.prepare(objective.module, optimizer)
    life = RunLifecycle(run_dir, cfg, acc, steps, acc.unwrap_model(wrapper).model, optimizer,
                        scheduler, resume=resume, on_eval=on_eval)

    global_batch = cfg.batch_size * cfg.grad_accum * world
    batches = global_batches(len(train_set), global_batch, cfg.seed, life.start_step)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    # under gradient checkpointing (memory first) the CPU heap is trimmed after every step
    trim_heap = cfg.gradient_checkpointing and acc.device.type == "cpu"

    for step in life.steps_to_run():
        batch = [train_set[i] for i in next(batches)]
        # every rank sees the whole global batch's indices, so the normaliser needs no all-reduce
        weight = objective.weight(batch) or 1
        wrapper.train()
        loss_total = torch.zeros((), device=acc.device)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            lo = (micro * world + rank) * cfg.batch_size
            sync = micro == cfg.grad_accum - 1
            with (nullcontext() if sync else acc.no_sync(wrapper)), autocast(), compiled_layers(layers):
                loss, metrics = objective.loss(wrapper, batch[lo : lo + cfg.batch_size], acc.device)
            acc.backward(loss * (world / weight))
            loss_total += loss.detach().float()
            _accumulate(sums, metrics)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(acc.clip_grad_norm_(wrapper.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if trim_heap:
            release_free_memory()

        loss_value = float(acc.reduce(loss_total, "sum")) / weight
        step_tokens = sum(objective.tokens(ex) for ex in batch)
        record = {"step": step, "epoch": round(step * global_batch / len(train_set), 4),
                  "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens": step_tokens, "trained_tokens": weight,
                  "tokens_per_s": step_tokens / life.step_seconds(), "elapsed_s": life.elapsed()}
        record.update(_means(sums, weight, acc))
        life.step_done(step, record, loss_value, tokens=step_tokens, trained_tokens=weight)

        improved = False
        if val_set and life.eval_due(step):
            val = {f"val_{k}": v for k, v in
                   evaluate(objective, wrapper, val_set, cfg.batch_size, acc, autocast).items()}
            if "val_loss" in val:
                val["val_ppl"] = math.exp(min(val["val_loss"], 50))
            if metrics_fn is not None:
                val.update({f"val_{k}": float(v) for k, v in
                            metrics_fn(acc.unwrap_model(wrapper).model).items()})
                wrapper.train()
            improved = life.validated(step, val)
        life.checkpoint(step, improved)
    return life.finish()


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v


def _means(sums: dict[str, torch.Tensor], weight: float, acc: Accelerator) -> dict[str, float]:
    """Metric sums of this process's share -> means over the global batch's weight."""
    return {k: float(acc.reduce(v, "sum")) / weight for k, v in sorted(sums.items())}


@torch.no_grad()
def evaluate(objective: Objective, wrapper, examples: list, batch_size: int, acc: Accelerator,
             autocast=nullcontext) -> dict[str, float]:
    """Mean loss and metrics over ``examples`` (sharded over processes, summed, then divided)."""
    wrapper.eval()
    loss = torch.zeros((), device=acc.device)
    sums: dict[str, torch.Tensor] = {}
    mine = examples[acc.process_index :: acc.num_processes]
    for lo in range(0, len(mine), batch_size):
        with autocast():
            s, metrics = objective.loss(wrapper, mine[lo : lo + batch_size], acc.device)
        loss += s.float()
        _accumulate(sums, metrics)
    weight = acc.reduce(torch.tensor(float(objective.weight(mine)), device=acc.device), "sum")
    weight = float(weight.clamp(min=1))
    # every process must take part in each reduce, even one whose shard was empty
    keys = sorted(set(objective.metric_keys) | set(sums))
    out = {"loss": float(acc.reduce(loss, "sum")) / weight}
    out.update(_means({k: sums.get(k, torch.zeros((), device=acc.device)) for k in keys}, weight, acc))
    wrapper.train()
    return out


def _enable_gradient_checkpointing(model) -> None:
    base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
