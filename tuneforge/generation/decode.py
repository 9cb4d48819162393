"""Decoding: `tuneforge generate` / `chat` (:func:`generate_reply`), batched generation
(:func:`generate_batch`, evaluation) and one batch of token-id prompts with per-row settings
(:func:`generate_rows`). Serving and rollouts run on the continuous-batching engine of
:mod:`tuneforge.generation.engine`, which shares this module's sampler and caches and gives the
same tokens.

:func:`generate_batch` renders each conversation with the chat template, sorts the prompts by
length, and for each batch left-pads, prefills once and decodes step by step with a KV cache
that is allocated once per batch and written in place (no per-step concatenation). Each row
stops at the end-of-turn token (``tokenizer.eos_token_id``) or after ``max_new_tokens``;
finished rows are dropped from the batch once enough of them have finished to pay for
compacting the cache. Only the last position's logits are computed, and greedy decoding and
sampling run on those alone.

``precision`` picks the model that runs (the fp32 model, or its bf16/int4 inference copy):
see :mod:`tuneforge.generation.inference_copy`.

Sampled output depends only on ``seed`` and the conversation's index in the list, not on
``batch_size`` or on the other prompts: every conversation has its own random stream.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from tuneforge.data.render import render_prompt
from tuneforge.generation.inference_copy import (
    PRECISIONS,
    inference_model,
    model_device,
    model_dtype,
)

CACHES = ("preallocated", "dynamic", "static")
_COMPILE_BUCKET = 128


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
    ``model.generate``'s greedy reply; ``"auto"``/``"bf16"`` is several times faster for the
    built-in model on a bf16 CPU (measured: bench/README.md), but near-ties can flip greedy
    tokens (on "What is the capital of France?" the built-in model answered "L'Étoile..." in
    bf16 and "Paris" in fp32).
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
    compiles once, which takes tens of seconds for the built-in model on 2 cores; then batch-1
    decoding is clearly faster, batch 8 no faster (measured: bench/README.md). Worth it only
    for a long-lived server at batch 1, so off by default. ``cache`` picks the KV cache, for
    measuring: ``"dynamic"`` (transformers' DynamicCache, which concatenates every step) and
    ``"static"`` (its StaticCache: attention over the whole preallocated length) were both
    slower than the default.

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
    prompts, stop_token_ids, pad_id = prepare_prompts(conversations, tokenizer, stop_token_ids)
    batch_size = batch_size or min(len(prompts), 32)

    run_model, autocast = inference_model(model, precision)
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
                    cache=cache,
                    always_mask=autocast or model_dtype(run_model) != torch.float32,
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


def prepare_prompts(conversations, tokenizer, stop_token_ids=None):
    """The conversations' prompt ids (chat template, generation prompt), the stop ids (the
    tokenizer's EOS unless given) and the pad id (the tokenizer's, else the first stop id)."""
    prompts = [render_prompt(messages, tokenizer) for messages in conversations]
    if stop_token_ids is None:
        stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_token_ids[0] if stop_token_ids else 0
    return prompts, list(stop_token_ids), pad_id


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

    The whole batch runs until its longest row is done (the server uses
    :class:`~tuneforge.generation.engine.DecodeEngine` instead, where rows join and leave at
    every step, with the same tokens): rows stop at ``stop_token_ids``, at their own
    ``max_new_tokens``, or when ``on_token`` says so (finish reason ``"stop"``). Greedy rows give the same tokens
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
            always_mask=autocast or model_dtype(run_model) != torch.float32,
        )


# ----------------------------------------------------------------------------- the decode loop


def _generate_rows(model, prompts, settings, *, stop_ids, pad_id, compile, cache, always_mask,
                   on_token=None):
    """Generate for one batch of prompts; [(new token ids, finish reason)] in input order.

    ``settings`` holds one :class:`RowSettings` per prompt; the batch runs until its longest
    row is done. ``on_token`` (see :data:`TokenCallback`) sees every token as it is made.
    """
    device = model_device(model)
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


def row_generator(settings: RowSettings, device: torch.device) -> torch.Generator:
    """The random stream of a sampled row: seeded by its ``seed`` and ``stream`` alone."""
    return torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + settings.stream)


class _Sampler:
    """Next token per row from the last position's logits: greedy rows take the argmax,
    sampled rows draw from their own random stream (:class:`RowSettings`)."""

    def __init__(self, settings: list[RowSettings], device: torch.device):
        self.temperature = torch.tensor([s.temperature for s in settings], device=device)
        # Rows without a nucleus cut get an infinite threshold: nothing is cut, not even the
        # tail whose cumulative sum rounds to 1.
        self.top_p = torch.tensor([s.top_p if s.top_p < 1.0 else float("inf")
                                   for s in settings], device=device)
        self.generators = {r: row_generator(s, device)
                           for r, s in enumerate(settings) if s.temperature > 0}

    def pick(self, logits: torch.Tensor, running: list[int]) -> torch.Tensor:
        """(rows,) token ids for ``logits`` (rows, vocab) of the ``running`` original rows."""
        sampled = [j for j, row in enumerate(running) if row in self.generators]
        rows = [running[j] for j in sampled]
        return next_tokens(logits, sampled, self.temperature[rows], self.top_p[rows],
                           [self.generators[r] for r in rows])


def next_tokens(logits: torch.Tensor, sampled: list[int], temperature: torch.Tensor,
                top_p: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(rows,) next token ids from ``logits`` (rows, vocab): the argmax, except at the places
    ``sampled``, which draw from ``softmax(logits / temperature)`` cut to the ``top_p`` nucleus
    (``inf``: no cut), each with its own generator (one per sampled place, in order).

    A sampled row's draw uses its generator alone, so it does not depend on the rows beside it
    (the serving engine and :func:`generate_batch` share this: the same seed, the same tokens).
    """
    logits = logits.float()
    tokens = logits.argmax(-1)
    if not sampled:
        return tokens
    where = torch.tensor(sampled, device=logits.device)
    chosen = logits.index_select(0, where) / temperature[:, None]
    top_p = top_p[:, None]
    if bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = chosen.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        chosen = torch.full_like(chosen, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = chosen.softmax(-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; one stream per row.
    noise = torch.empty_like(probs)
    for k, generator in enumerate(generators):
        noise[k].exponential_(generator=generator)
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
                    COMPILE_FAILED.add(self.model)
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


# ----------------------------------------------------------------------------- helpers


def _autocast(model, enabled: bool):
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16, enabled=enabled)


# model -> its compiled forward; models whose compilation failed (they decode eagerly).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()


def _compiled_forward(model):
    """``torch.compile`` of the model's forward, once per model; None where it can't be."""
    if model in COMPILE_FAILED:
        return None
    fn = _COMPILED.get(model)
    if fn is None:
        try:
            fn = torch.compile(model.forward, dynamic=False)
        except Exception:  # noqa: BLE001
            COMPILE_FAILED.add(model)
            return None
        _COMPILED[model] = fn
    return fn
