"""Text generation: `tuneforge generate` / `chat` (:func:`generate_reply`) and batched rollouts
and serving (:func:`generate_batch`).

:func:`generate_batch` renders each conversation with the chat template, sorts the prompts by
length, and for each batch left-pads, prefills once and decodes step by step with a KV cache
that is allocated once per batch and written in place (no per-step concatenation). Each row
stops at the end-of-turn token (``tokenizer.eos_token_id``) or after ``max_new_tokens``;
finished rows are dropped from the batch once enough of them have finished to pay for
compacting the cache. Only the last position's logits are computed, and greedy decoding and
sampling run on those alone.

Precision:

- ``"fp32"`` runs the model as given; its greedy output equals ``model.generate``'s.
- ``"bf16"`` runs an inference copy whose linear layers hold bf16 weights (matmuls take bf16
  inputs and accumulate in fp32; the residual stream, norms and attention stay fp32, as under
  autocast). A PEFT adapter is merged in, made once per model and reused until its parameters
  or active adapters change (after an optimizer step it is rebuilt, about 2 s for 135M).
  Weights that lie exactly on a GGUF grid (groups of 32: Q4_0/Q4_1 16 levels, Q8_0 multiples
  of a scale), as the built-in model's do, are also packed as int4 (one part for Q4, two for
  Q8) and decode steps with few rows multiply with those: 4x (2x) fewer bytes per token, no
  more rounding than bf16 (scale and offset in bf16). A LoRA adapter on such a base is kept
  unmerged (a small fp32 branch) so the base stays packed.
- ``"autocast"`` runs the fp32 model under bf16 autocast (measured slower than ``"bf16"``:
  it re-casts the weights at every step).
- ``"auto"`` (the default) is ``"bf16"`` where the hardware has native bf16 matmuls
  (:func:`tuneforge.train.loop.use_bf16`) and ``"fp32"`` elsewhere.

Sampled output depends only on ``seed`` and the conversation's index in the list, not on
``batch_size`` or on the other prompts: every conversation has its own random stream.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from tuneforge.data.render import render_prompt

PRECISIONS = ("auto", "fp32", "bf16", "autocast")
CACHES = ("preallocated", "dynamic", "static")

# Decode steps with at most this many rows use the packed int4 weights (a quarter of that for
# two-part Q8 weights); above it bf16 matmuls are faster (2-core AVX512-bf16 CPU, the built-in
# model's layers: int4 5x faster than bf16 at 1 row, 1.9x at 8, 1.2x at 16, 0.8x at 32).
INT4_MAX_ROWS = 16
_INT4_GROUP = 32
_COMPILE_BUCKET = 128
# Whether bf16 copies also pack exactly-4-bit linear layers as int4, and run activations in
# bf16 rather than fp32 (both for measuring; the defaults measured best).
PACK_INT4 = True
BF16_ACTIVATIONS = False


@dataclass
class GenerationResult:
    """One generated turn.

    ``token_ids`` are the new tokens, the stop token included when the row stopped on it;
    ``text`` is their decoding without special tokens, stripped. ``finish_reason`` is ``"stop"``
    (a stop token was generated) or ``"length"`` (``max_new_tokens`` reached).
    """

    text: str
    token_ids: list[int]
    num_new_tokens: int
    finish_reason: str
    prompt_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class RowSettings:
    """How one prompt of a batch is decoded; rows of one batch may differ (a server batches
    requests with their own settings).

    ``temperature=0`` is greedy. A sampled row draws from its own random stream, seeded by
    ``seed`` and ``stream`` alone, so its output does not depend on the rows beside it.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0


# Called once per generated token of a row: (row index in the batch, token id). Returning True
# finishes that row now with finish reason "stop" (a stop string matched, the client left).
TokenCallback = Callable[[int, int], bool]


def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   precision: str = "fp32") -> str:
    """The assistant's next turn after ``messages``, stopping at the end-of-turn token.

    One conversation through :func:`generate_batch`. The default ``fp32`` gives exactly
    ``model.generate``'s greedy reply; ``"auto"``/``"bf16"`` is ~3x faster for the built-in
    model on a bf16 CPU, but near-ties can flip greedy tokens (on "What is the capital of
    France?" the built-in model answered "L'Étoile..." in bf16 and "Paris" in fp32).
    """
    result = generate_batch(
        model, tokenizer, [messages], max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, precision=precision,
    )[0]
    return result.text


def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    precision: str = "auto",
    stop_token_ids: list[int] | None = None,
    compile: bool = False,
    cache: str = "preallocated",
) -> list[GenerationResult]:
    """The assistant's next turn for each conversation, in the order given.

    ``batch_size`` (default: all at once, up to 32) bounds how many prompts run together;
    prompts are grouped by length so that little padding is computed. ``temperature=0`` is
    greedy; otherwise tokens are sampled from ``softmax(logits / temperature)`` cut to the
    top-``top_p`` nucleus. ``stop_token_ids`` defaults to ``[tokenizer.eos_token_id]``.

    ``compile=True`` runs decode steps through ``torch.compile`` with a static cache (falling
    back to eager if compilation fails). Each batch size and cache length (rounded up to 128)
    compiles once, about 40 s for the built-in model on 2 cores; then batch-1 decoding is about
    35% faster, batch 8 no faster. Worth it only for a long-lived server at batch 1, so off
    by default. ``cache`` picks the KV cache, for measuring: ``"dynamic"`` (transformers'
    DynamicCache, which concatenates every step) and ``"static"`` (its StaticCache: attention
    over the whole preallocated length) were both slower than the default.

    The fp32 model is switched to eval mode for the call (no dropout) and back afterwards.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if cache not in CACHES:
        raise ValueError(f"cache {cache!r} unknown; use one of {', '.join(CACHES)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not conversations:
        return []
    prompts = [render_prompt(messages, tokenizer) for messages in conversations]
    if stop_token_ids is None:
        stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_token_ids[0] if stop_token_ids else 0
    batch_size = batch_size or min(len(prompts), 32)

    run_model, autocast = _inference_model(model, precision)
    was_training, run_was_training = model.training, run_model.training
    model.eval()
    run_model.eval()
    results: list[GenerationResult | None] = [None] * len(prompts)
    # Longest first (the first batch shows the peak memory); neighbours have similar lengths.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    try:
        with torch.inference_mode(), _autocast(run_model, autocast):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                settings = [RowSettings(max_new_tokens, temperature, top_p, seed, stream=i)
                            for i in rows]
                decoded = _generate_rows(
                    run_model, [prompts[i] for i in rows], settings,
                    stop_ids=stop_token_ids, pad_id=pad_id, compile=compile,
                    cache=cache, always_mask=autocast or _dtype(run_model) != torch.float32,
                )
                for i, (ids, reason) in zip(rows, decoded):
                    results[i] = GenerationResult(
                        text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        token_ids=ids,
                        num_new_tokens=len(ids),
                        finish_reason=reason,
                        prompt_tokens=len(prompts[i]),
                        prompt_ids=prompts[i],
                    )
    finally:
        run_model.train(run_was_training)
        model.train(was_training)
    return results  # type: ignore[return-value]


def inference_model(model, precision: str = "auto"):
    """(model to run, whether to run it under bf16 autocast) for ``precision``: the model
    itself for fp32, else its bf16 inference copy (see the module docstring).

    A caller that keeps the copy may switch the adapters of ``model`` afterwards: a server
    makes one copy per adapter and reuses each.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    return _inference_model(model, precision)


def generate_rows(
    run_model,
    prompts: list[list[int]],
    settings: list[RowSettings],
    *,
    stop_token_ids: list[int],
    pad_id: int,
    autocast: bool = False,
    on_token: TokenCallback | None = None,
) -> list[tuple[list[int], str]]:
    """One batch of token-id prompts, each with its own :class:`RowSettings`, on a model from
    :func:`inference_model` (in eval mode): [(new token ids, finish reason)] in input order.

    The server's entry point: rows stop at ``stop_token_ids``, at their own ``max_new_tokens``,
    or when ``on_token`` says so (finish reason ``"stop"``). Greedy rows give the same tokens
    whatever else shares the batch (in fp32).
    """
    if not prompts:
        return []
    if len(settings) != len(prompts) or any(not p for p in prompts):
        raise ValueError("need one RowSettings per prompt, and no empty prompt")
    if min(s.max_new_tokens for s in settings) < 1:
        raise ValueError("max_new_tokens must be at least 1")
    with torch.inference_mode(), _autocast(run_model, autocast):
        return _generate_rows(
            run_model, prompts, settings, stop_ids=stop_token_ids, pad_id=pad_id,
            compile=False, cache="preallocated", on_token=on_token,
            always_mask=autocast or _dtype(run_model) != torch.float32,
        )


# ----------------------------------------------------------------------------- the decode loop


def _generate_rows(model, prompts, settings, *, stop_ids, pad_id, compile, cache, always_mask,
                   on_token=None):
    """Generate for one batch of prompts; [(new token ids, finish reason)] in input order.

    ``settings`` holds one :class:`RowSettings` per prompt; the batch runs until its longest
    row is done. ``on_token`` (see :data:`TokenCallback`) sees every token as it is made.
    """
    device = _device(model)
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    max_steps = max(s.max_new_tokens for s in settings)
    capacity = width + max_steps
    if compile:  # compiled graphs are per shape: round up so that later batches reuse them
        capacity = -(-capacity // _COMPILE_BUCKET) * _COMPILE_BUCKET
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        mask[r, width - len(p) : width] = True
    padded = min(lengths) != width
    positions = (mask[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    sampler = _Sampler(settings, device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=device)

    step = _Stepper(model, capacity, compile=compile, cache=cache,
                    use_mask=padded or always_mask)
    logits = step.prefill(input_ids, mask, width, positions, padded)

    out: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    running = list(range(batch))  # the original row at each place of the running batch
    active = [True] * batch  # finished rows may stay in the batch until it is compacted
    next_pos = positions[:, -1:] + 1
    length = width
    for t in range(max_steps):
        tokens = sampler.pick(logits, running)
        token_list = tokens.tolist()
        hit = torch.isin(tokens, stop).tolist()
        for j, row in enumerate(running):
            if not active[j]:
                continue
            out[row].append(token_list[j])
            if hit[j] or (on_token is not None and on_token(row, token_list[j])):
                reasons[row] = "stop"
                active[j] = False
            elif len(out[row]) >= settings[row].max_new_tokens:
                active[j] = False
        n_active = sum(active)
        if n_active == 0 or t == max_steps - 1:
            break
        if n_active < len(running) and step.should_compact(len(running), n_active):
            keep = [j for j, a in enumerate(active) if a]
            index = torch.tensor(keep, dtype=torch.long, device=device)
            step.select(index)
            mask = mask.index_select(0, index)
            tokens = tokens.index_select(0, index)
            next_pos = next_pos.index_select(0, index)
            running = [running[j] for j in keep]
            active = [True] * len(keep)
        mask[:, length] = True
        length += 1
        logits = step.decode(tokens[:, None], mask, length, next_pos)
        next_pos = next_pos + 1
    return [(out[r], reasons[r]) for r in range(batch)]


class _Sampler:
    """Next token per row from the last position's logits: greedy rows take the argmax,
    sampled rows draw from their own random stream (:class:`RowSettings`)."""

    def __init__(self, settings: list[RowSettings], device: torch.device):
        self.temperature = torch.tensor([s.temperature for s in settings], device=device)
        # Rows without a nucleus cut get an infinite threshold: nothing is cut, not even the
        # tail whose cumulative sum rounds to 1.
        self.top_p = torch.tensor([s.top_p if s.top_p < 1.0 else float("inf")
                                   for s in settings], device=device)
        self.generators = {
            r: torch.Generator(device=device).manual_seed(s.seed * 1_000_003 + s.stream)
            for r, s in enumerate(settings) if s.temperature > 0
        }

    def pick(self, logits: torch.Tensor, running: list[int]) -> torch.Tensor:
        """(rows,) token ids for ``logits`` (rows, vocab) of the ``running`` original rows."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        sampled = [j for j, row in enumerate(running) if row in self.generators]
        if not sampled:
            return tokens
        rows = torch.tensor([running[j] for j in sampled], device=logits.device)
        where = torch.tensor(sampled, device=logits.device)
        chosen = logits.index_select(0, where) / self.temperature[rows, None]
        top_p = self.top_p[rows, None]
        if bool((top_p < 1.0).any()):
            sorted_logits, sorted_idx = chosen.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
            sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
            chosen = torch.full_like(chosen, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
        probs = chosen.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; one stream per row.
        noise = torch.empty_like(probs)
        for k, j in enumerate(sampled):
            noise[k].exponential_(generator=self.generators[running[j]])
        tokens[where] = (probs / noise).argmax(-1)
        return tokens


class _Stepper:
    """Prefill and decode steps of one batch against its KV cache."""

    def __init__(self, model, capacity, *, compile, cache, use_mask):
        self.model = model
        self.capacity = capacity
        self.use_mask = use_mask
        self.forward = _compiled_forward(model) if compile else None
        self.static = self.forward is not None or cache == "static"
        if self.static:
            self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        elif cache == "dynamic":
            self.cache = DynamicCache(config=model.config)
        else:
            self.cache = _preallocated_cache(model.config, capacity)

    def should_compact(self, before: int, after: int) -> bool:
        # Static caches have a fixed batch. Elsewhere compacting costs about one step's cache
        # traffic: do it once a quarter of the rows (or all but one) are done.
        if self.static:
            return False
        return after == 1 or (before - after) * 4 >= before

    def select(self, index):
        for layer in self.cache.layers:
            layer.batch_select_indices(index)

    def _run(self, fn, input_ids, attn, positions):
        return fn(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                  cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def prefill(self, input_ids, mask, width, positions, padded):
        if self.static:
            attn = _static_prefill_mask(mask, width)
        else:
            attn = mask[:, :width] if padded else None
        return self._run(self.model, input_ids, attn, positions)

    def decode(self, tokens, mask, length, positions):
        if self.static:
            # The mask spans the whole cache; slots not written yet are masked out.
            attn = mask[:, None, None, :]
            if self.forward is not None:
                try:
                    return self._run(self.forward, tokens, attn, positions)
                except Exception:  # noqa: BLE001 - any compiler failure: carry on eagerly
                    _COMPILE_FAILED.add(self.model)
                    self.forward = None
            return self._run(self.model, tokens, attn, positions)
        # Passing a mask (even all true) also keeps transformers on its packed-GQA attention
        # for one query token, which in bf16 on CPU is several times faster than enable_gqa.
        attn = mask[:, None, None, :length] if self.use_mask else None
        return self._run(self.model, tokens, attn, positions)


def _static_prefill_mask(mask, width):
    """(batch, 1, width, capacity) boolean prefill mask for a static cache."""
    causal = torch.ones((width, mask.shape[1]), dtype=torch.bool, device=mask.device).tril()
    keys = mask.clone()
    keys[:, width:] = False
    attn = causal[None] & keys[:, None, :]
    # Pad positions see nothing; let them see everything instead (their output is unused),
    # so attention makes no NaN that would reach real rows through the cache.
    return (attn | ~attn.any(-1, keepdim=True))[:, None]


# ----------------------------------------------------------------------------- the KV cache


def _preallocated_cache(config, capacity):
    """A DynamicCache whose layers write into buffers sized for the whole generation."""
    cache = DynamicCache(config=config)
    n_layers = config.get_text_config(decoder=True).num_hidden_layers
    cache.layers = [_PreallocatedLayer(capacity) for _ in range(n_layers)]
    return cache


class _PreallocatedLayer(DynamicLayer):
    """Keys and values in buffers of ``capacity`` positions, written in place; attention sees a
    view of the filled part only (a DynamicLayer concatenates, copying its whole cache each step).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.k_buf = key_states.new_empty((b, h, self.capacity, d))
        self.v_buf = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.keys = self.k_buf[:, :, :0]
        self.values = self.v_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.k_buf[:, :, :end]
        self.values = self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.k_buf = self.k_buf.index_select(0, indices)
            self.v_buf = self.v_buf.index_select(0, indices)
            self.keys = self.k_buf[:, :, : self.length]
            self.values = self.v_buf[:, :, : self.length]


# ----------------------------------------------------------------------------- precision


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _bf16_native(device: torch.device) -> bool:
    from tuneforge.train.loop import use_bf16

    return use_bf16("auto", device)


def _autocast(model, enabled: bool):
    return torch.autocast(_device(model).type, dtype=torch.bfloat16, enabled=enabled)


# model -> (parameter signature, bf16 copy); rebuilt when a parameter changes in place.
_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()


def _inference_model(model, precision: str):
    """(model to run, whether to run it under bf16 autocast) for ``precision``."""
    if precision == "auto":
        precision = "bf16" if _bf16_native(_device(model)) else "fp32"
    if precision == "fp32":
        return model, False
    if precision == "autocast":
        return model, True
    if _dtype(model) != torch.float32:
        return model, False  # already low precision: run as is
    signature = (tuple((p.data_ptr(), p._version) for p in model.parameters()),
                 _adapter_state(model))
    cached = _BF16_COPIES.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1], False
    _BF16_COPIES.pop(model, None)  # free the stale copy before making the next one
    with torch.autocast(_device(model).type, enabled=False):  # not the caller's (training) one
        dup = _bf16_copy(model)
    _BF16_COPIES[model] = (signature, dup)
    return dup, False


def _adapter_state(model):
    """Which PEFT adapters are active or disabled: the inference copy depends on it too."""
    return tuple((bool(m.disable_adapters), tuple(m.active_adapters))
                 for m in model.modules() if hasattr(m, "_disable_adapters"))


def _bf16_copy(model, *, pack_int4: bool | None = None, bf16_activations: bool | None = None):
    """An inference copy of ``model`` with bf16 matmul weights: a PEFT adapter merged in, every
    linear layer's weight in bf16 (and packed as int4 too where that is exact).

    Activations between the matmuls (residual stream, norms, attention) stay fp32, as under
    autocast: the matmuls take bf16 inputs and accumulate in fp32. ``bf16_activations`` runs
    everything in bf16 instead (for measuring: no faster, and it drifts from fp32 sooner).
    """
    pack_int4 = PACK_INT4 if pack_int4 is None else pack_int4
    bf16_activations = BF16_ACTIVATIONS if bf16_activations is None else bf16_activations
    with torch.no_grad():
        dup = copy.deepcopy(model)
        for p in dup.parameters():
            p.grad = None
            p.requires_grad_(False)
        pack_int4 = pack_int4 and _int4_available(_device(dup))
        out_dtype = torch.bfloat16 if bf16_activations else torch.float32
        if hasattr(dup, "get_base_model"):  # a PeftModel
            unmerged = _lora_unmerged(dup, pack_int4, out_dtype) if pack_int4 else None
            if unmerged is not None:
                dup = unmerged
            else:
                try:
                    # the layers' flag (PeftModel also has a disable_adapters *method*, truthy)
                    disabled = any(m.disable_adapters for m in dup.modules()
                                   if hasattr(m, "_disable_adapters"))
                    dup = dup.unload() if disabled else dup.merge_and_unload()
                except Exception:  # noqa: BLE001 - adapters that cannot merge run unmerged
                    pass
        linears = [(name, m) for name, m in dup.named_modules() if type(m) is torch.nn.Linear]
        for name, linear in linears:
            parts = _int4_parts(linear.weight) if pack_int4 else None
            parent_name, _, child = name.rpartition(".")
            setattr(dup.get_submodule(parent_name), child,
                    _InferenceLinear(linear, parts, out_dtype=out_dtype))
        if bf16_activations:
            dup = dup.to(torch.bfloat16)
    return dup.eval()


def _lora_unmerged(dup, pack_int4: bool, out_dtype):
    """The base model of a PEFT LoRA model with each LoRA layer replaced by its base weight
    packed as int4 plus a bf16 low-rank branch, where every base weight packs exactly (merging
    the adapter would move the weights off the 4-bit grid and lose the packing); else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None
    plan = []
    for name, module in dup.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or module.merged:
            return None
        parts = _int4_parts(base.weight)
        if parts is None:
            return None
        branches = []
        if not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                if adapter in getattr(module, "lora_variant", {}) or (
                        module.lora_B[adapter].bias is not None):
                    return None  # DoRA and other variants, LoRA biases: merge instead
                a = module.lora_A[adapter].weight
                b = module.lora_B[adapter].weight * module.scaling[adapter]
                branches.append((a.float(), b.float()))
        plan.append((name, base, parts, branches))
    if not plan:
        return None
    for name, base, parts, branches in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(dup.get_submodule(parent_name), child,
                _InferenceLinear(base, parts, out_dtype=out_dtype, lora=branches))
    return dup.get_base_model()


def _int4_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu")


def _int4_parts(weight: torch.Tensor):
    """The weight as a sum of int4-packed parts, if that is exact; else None.

    Each group of 32 weights along the input dimension must either take at most 16 equally
    spaced values (a de-quantised Q4_0/Q4_1 GGUF tensor: one part, w = (q - 8) * s + z) or be
    integer multiples -127..127 of one scale (Q8_0: two parts, q = 16 * high + low). Weights
    off such a grid are never packed: packing must not lose precision. Returns a list of
    (packed weight, bf16 scales and offsets) for ``_weight_int4pack_mm_for_cpu``.
    """
    n, k = weight.shape
    if k % _INT4_GROUP or n % 16 or weight.numel() == 0:
        return None
    w = weight.detach().float().reshape(n, k // _INT4_GROUP, _INT4_GROUP)
    low = w.amin(-1, keepdim=True)
    step = (w.amax(-1, keepdim=True) - low) / 15
    if _on_grid(w, low, step, 0, 15):
        q = ((w - low) / _nonzero(step)).round()
        parts = [(q, step, low + 8 * step)]
    else:
        step = w.abs().amax(-1, keepdim=True) / 127
        if not _on_grid(w, 0, step, -127, 127):
            return None
        q = (w / _nonzero(step)).round()
        low_digit = q.remainder(16)
        high_digit = (q - low_digit) / 16 + 8
        parts = [(high_digit, 16 * step, torch.zeros_like(step)), (low_digit, step, 8 * step)]
    try:
        packed = []
        for digits, scale, offset in parts:
            pw = torch._convert_weight_to_int4pack_for_cpu(digits.reshape(n, k).to(torch.int32), 2)
            sz = torch.stack([scale[..., 0].t(), offset[..., 0].t()], dim=-1)
            packed.append((pw, sz.to(torch.bfloat16).contiguous()))
        probe = torch.randn(2, k).to(torch.bfloat16)
        got = sum(torch._weight_int4pack_mm_for_cpu(probe, pw, _INT4_GROUP, sz).float()
                  for pw, sz in packed)
        want = probe.float() @ weight.detach().float().t()
        if not torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return packed


def _nonzero(step):
    return torch.where(step > 0, step, torch.ones_like(step))


def _on_grid(w, low, step, lo, hi) -> bool:
    q = ((w - low) / _nonzero(step)).round()
    return bool(q.min() >= lo and q.max() <= hi
                and ((q * step + low) - w).abs().le(1e-3 * _nonzero(step)).all())


class _InferenceLinear(torch.nn.Linear):
    """A linear layer of the inference copy: bf16 weight, bf16 input, fp32 accumulation, output
    in ``out_dtype``. Where the weight packs exactly into int4 parts (:func:`_int4_parts`),
    small batches of rows multiply with those instead: a quarter (Q4) or half (Q8) of the bytes
    to read. The input is made contiguous: ``logits_to_keep`` hands the output layer a strided
    slice, for which a bf16 matmul would copy the whole weight once per sequence."""

    def __init__(self, linear: torch.nn.Linear, int4_parts=None, *, out_dtype=torch.float32,
                 lora=()):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16),
                                         requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        self.int4_parts = int4_parts or []
        # Measured crossovers (2-core AVX512-bf16 CPU): one part beats bf16 up to ~20 rows,
        # two parts up to ~4.
        self.int4_max_rows = INT4_MAX_ROWS // len(self.int4_parts) ** 2 if int4_parts else 0
        self.lora = list(lora)  # (A, B * scaling) in fp32: an unmerged LoRA branch

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in.to(torch.bfloat16).contiguous()
        rows = x.numel() // self.in_features
        if rows > self.int4_max_rows:
            y = F.linear(x, self.weight)
        else:
            flat = x.reshape(rows, self.in_features)
            y = None
            for packed, scales_zeros in self.int4_parts:
                part = torch._weight_int4pack_mm_for_cpu(flat, packed, _INT4_GROUP, scales_zeros)
                y = part.float() if y is None else y + part
            y = y.reshape(*x.shape[:-1], self.out_features)
        for a, b in self.lora:  # small fp32 matmuls: faster than bf16 ones on CPU
            y = y.float() + F.linear(F.linear(x_in.float(), a), b)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


def _compiled_forward(model):
    """``torch.compile`` of the model's forward, once per model; None where it can't be."""
    if model in _COMPILE_FAILED:
        return None
    fn = _COMPILED.get(model)
    if fn is None:
        try:
            fn = torch.compile(model.forward, dynamic=False)
        except Exception:  # noqa: BLE001
            _COMPILE_FAILED.add(model)
            return None
        _COMPILED[model] = fn
    return fn
