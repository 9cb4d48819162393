"""The shared training loop: one optimizer step = one global batch, however it is split.

Every recipe trains through :func:`train`. What it guarantees:

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

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from tuneforge.config import TrainConfig, lower_is_better
from tuneforge.errors import ConfigError
from tuneforge.models.attention import use_packed_attention
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.compile import CompiledLayers, compiled_layers, use_compile
from tuneforge.train.lifecycle import EvalHook, TrainResult, current_eval_hook
from tuneforge.train.memory import release_free_memory
from tuneforge.train.objectives import CausalLMObjective, Objective
from tuneforge.train.progress import Progress

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
    on_eval = on_eval or current_eval_hook()
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

    ckpt_root = run_dir / "checkpoints"
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    state = {"best_metric": None, "best_step": None, "bad_evals": 0, "tokens": 0,
             "trained_tokens": 0, "seconds": 0.0}
    start_step = 0
    if resume and (latest := ckpt.latest_checkpoint(ckpt_root)) is not None:
        saved = ckpt.load_checkpoint(latest, model=acc.unwrap_model(wrapper).model,
                                     optimizer=optimizer, rank=rank)
        scheduler.load_state_dict(saved["scheduler"])
        state.update({k: saved[k] for k in state})
        start_step = saved["step"]
        if acc.is_main_process:
            _truncate_metrics(metrics_path, start_step)
            print(f"tuneforge: resumed from {latest} (step {start_step}/{steps})", file=sys.stderr,
                  flush=True)
    elif acc.is_main_process and metrics_path.exists():
        metrics_path.unlink()

    history = _read_metrics(metrics_path) if acc.is_main_process else []
    global_batch = cfg.batch_size * cfg.grad_accum * world
    batches = global_batches(len(train_set), global_batch, cfg.seed, start_step)
    progress = Progress(steps, start_step, enabled=cfg.progress and acc.is_main_process)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    # under gradient checkpointing (memory first) the CPU heap is trimmed after every step
    trim_heap = cfg.gradient_checkpointing and acc.device.type == "cpu"
    minimise = lower_is_better(cfg.metric_for_best)
    stopped_early = False
    stop_note = ""
    last_loss = None
    step = start_step
    t_start = time.perf_counter() - state["seconds"]

    def log(record: dict) -> None:
        if acc.is_main_process:
            history.append(record)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    for step in range(start_step + 1, steps + 1):
        t0 = time.perf_counter()
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

        last_loss = float(acc.reduce(loss_total, "sum")) / weight
        step_tokens = sum(objective.tokens(ex) for ex in batch)
        state["tokens"] += step_tokens
        state["trained_tokens"] += weight
        elapsed = time.perf_counter() - t0
        state["seconds"] = time.perf_counter() - t_start
        record = {"step": step, "epoch": round(step * global_batch / len(train_set), 4),
                  "loss": last_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens": step_tokens, "trained_tokens": weight,
                  "tokens_per_s": step_tokens / elapsed, "elapsed_s": state["seconds"]}
        record.update(_means(sums, weight, acc))
        if step % cfg.log_every == 0 or step == steps:
            log(record)
        progress.update(step, last_loss, record["tokens_per_s"])

        improved = False
        if val_set and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            val = {f"val_{k}": v for k, v in
                   evaluate(objective, wrapper, val_set, cfg.batch_size, acc, autocast).items()}
            if "val_loss" in val:
                val["val_ppl"] = math.exp(min(val["val_loss"], 50))
            if metrics_fn is not None:
                val.update({f"val_{k}": float(v) for k, v in
                            metrics_fn(acc.unwrap_model(wrapper).model).items()})
                wrapper.train()
            if cfg.metric_for_best not in val:
                raise ConfigError(f"train.metric_for_best={cfg.metric_for_best!r} is not among "
                                  f"the validation metrics: {', '.join(sorted(val))}")
            value, best = val[cfg.metric_for_best], state["best_metric"]
            delta = cfg.early_stopping_min_delta
            improved = best is None or (value < best - delta if minimise else value > best + delta)
            if improved:
                state.update(best_metric=value, best_step=step, bad_evals=0)
            else:
                state["bad_evals"] += 1
            log({"step": step, **val})
            progress.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                          + (" (best)" if improved else ""))
            patience = cfg.early_stopping_patience
            stopped_early = bool(patience and state["bad_evals"] >= patience and step < steps)
            stop_note = (f"no improvement of {cfg.metric_for_best} in {patience} evaluations"
                         if stopped_early else "")
            if on_eval is not None and on_eval(step, val) and step < steps:
                stopped_early, stop_note = True, "stopped by the on_eval hook (e.g. a sweep's pruner)"

        periodic = cfg.save_every and step % cfg.save_every == 0
        if periodic or improved or step == steps or stopped_early:
            _save(acc, wrapper, optimizer, scheduler, state, ckpt_root, step, cfg.keep_last)
        if stopped_early:
            progress.note(f"early stopping at step {step}: {stop_note}")
            break
    progress.close()

    if state["best_step"] is not None and val_set:
        # The run's result is its best checkpoint, not its last step.
        best_dir = ckpt_root / f"{ckpt.STEP_PREFIX}{state['best_step']:06d}"
        ckpt.load_trainable(best_dir, acc.unwrap_model(wrapper).model)
    acc.wait_for_everyone()
    return TrainResult(steps=step, final_loss=last_loss, best_metric=state["best_metric"],
                       best_step=state["best_step"], stopped_early=stopped_early,
                       trained_tokens=state["trained_tokens"], tokens=state["tokens"],
                       seconds=state["seconds"], history=history)


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


def _save(acc, wrapper, optimizer, scheduler, state, root, step, keep_last) -> None:
    model = acc.unwrap_model(wrapper).model
    ckpt.save_checkpoint(root, step, model=model, optimizer=optimizer,
                         state={**state, "scheduler": scheduler.state_dict()},
                         rank=acc.process_index, barrier=acc.wait_for_everyone)
    if acc.is_main_process:
        keep = {f"{ckpt.STEP_PREFIX}{state['best_step']:06d}"} if state["best_step"] else set()
        ckpt.prune_checkpoints(root, keep_last, keep)


def _enable_gradient_checkpointing(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (the killed run's tail)."""
    kept = [r for r in _read_metrics(path) if r["step"] <= step]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
