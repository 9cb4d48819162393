"""Continuous batching: a decode engine that rows join and leave at every step.

:class:`DecodeEngine` owns the decode loop of one model (one adapter). Rows are
:meth:`~DecodeEngine.submit`-ted at any time; each :meth:`~DecodeEngine.step`:

1. admits waiting rows while there is room (``max_rows`` running rows, ``prefill_tokens``
   padded prompt tokens per prefill): their prompts are prefilled together, left-padded, in a
   cache of their own, their first token is picked from the prefill's logits, and their keys
   and values are copied into free slots of the running cache;
2. runs one decode step over every running row (newcomers included) and picks each row's
   next token;
3. removes the rows that finished (stop token, their own ``max_new_tokens``, or their
   ``on_token`` callback said so): the last slot's row moves into the hole, so the running
   rows always fill slots ``0..n-1``.

The running cache is a preallocated buffer per layer of ``(slots, kv heads, columns, head
size)``. All rows write their next token at the same column (``length``); a row's prompt ends
at the column where it joined, and the columns before its first token are masked out. A
newcomer with a longer prompt than ``length`` shifts the running rows right once; columns no
running row uses any more are dropped (the live ones move left) once they are half of the
attended length, and the buffer grows when a row needs more columns than are left. Buffers
start zeroed, so a masked column never holds a NaN that attention's weighted sum would spread.

Greedy rows give the tokens :func:`~tuneforge.generation.decode.generate_rows` gives them alone
(fp32), whatever joins or leaves around them: a row attends only its own columns and every
row has its own positions. A sampled row draws from its own random stream
(:func:`~tuneforge.generation.decode.row_generator`), so its tokens depend only on its seed and
stream. The server (:mod:`tuneforge.serve.batcher`) keeps one engine per model id; rollouts
(:func:`generate_continuous`, used by tuneforge/train/rollouts.py) submit all their rows to
one engine and step it until it is idle.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from tuneforge.generation.decode import (
    GenerationResult,
    RowSettings,
    _autocast,
    _preallocated_cache,
    next_tokens,
    prepare_prompts,
    row_generator,
)
from tuneforge.generation.inference_copy import inference_model, model_device

_COLUMN_GRAIN = 128  # the cache grows in steps of this many columns
_COMPACT_MIN = 64  # dead leading columns worth moving the live ones left for


@dataclass(eq=False)
class EngineRow:
    """One prompt in a :class:`DecodeEngine`: what was submitted and what it has made so far.

    ``tokens`` are the new tokens (the stop token included when the row stopped on it);
    ``finish_reason`` is None while the row runs, then ``"stop"`` (a stop token, or
    ``on_token`` returned True) or ``"length"`` (``max_new_tokens`` reached). ``tag`` is the
    caller's (the server's job, a rollout's index).
    """

    prompt: list[int]
    settings: RowSettings
    stop_ids: frozenset[int]
    on_token: Callable[[int], bool] | None = None
    tag: object = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    start: int = 0  # the cache column of the row's first prompt token
    generator: torch.Generator | None = field(default=None, repr=False)


class DecodeEngine:
    """The decode loop of one model with continuous batching (see the module docstring).

    ``model`` comes from :func:`~tuneforge.generation.inference_model` and is in eval mode;
    ``autocast`` runs it under bf16 autocast. ``stop_token_ids`` end every row unless
    :meth:`submit` gives a row its own. One thread at a time may call :meth:`step`; the
    model may be swapped between steps (``engine.model = ...``, same weights: a server's
    adapter switch) but not its architecture.
    """

    def __init__(self, model, *, stop_token_ids: list[int], pad_id: int, autocast: bool = False,
                 max_rows: int = 16, prefill_tokens: int = 4096) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.model, self.autocast = model, autocast
        self.stop_ids = frozenset(stop_token_ids)
        self.pad_id = pad_id
        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        self.waiting: collections.deque[EngineRow] = collections.deque()
        self.rows: list[EngineRow] = []  # running rows, by slot
        self.step_rows = 0  # rows that ran in the last step's widest forward
        self._finished: list[EngineRow] = []  # rows finished in the step under way
        self._joining: list[EngineRow] = []  # rows taken from ``waiting`` in that step
        self.length = 0  # the column every running row writes its next token to
        self._k: list[torch.Tensor] = []  # per layer (slots, heads, columns, head size)
        self._v: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None  # (slots, columns) which columns a row sees
        self._tok: torch.Tensor | None = None  # (slots,) each row's last token
        self._pos: torch.Tensor | None = None  # (slots,) its position
        self._cache: DynamicCache | None = None

    # ------------------------------------------------------------------------------ the API

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    @property
    def room(self) -> int:
        """How many more rows may be submitted without waiting for one to finish."""
        return max(0, self.max_rows - len(self.rows) - len(self.waiting))

    def submit(self, prompt: list[int], settings: RowSettings, *,
               on_token: Callable[[int], bool] | None = None, tag: object = None,
               stop_token_ids: list[int] | None = None) -> EngineRow:
        """Queue one prompt (token ids); it joins the running rows at a coming step.

        ``on_token(token_id)`` is called for each new token of the row as it is made; returning
        True finishes the row now (finish reason ``"stop"``: a stop string, a client gone).
        """
        if not prompt:
            raise ValueError("empty prompt")
        if settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        stop = self.stop_ids if stop_token_ids is None else frozenset(stop_token_ids)
        row = EngineRow(list(prompt), settings, stop, on_token, tag)
        self.waiting.append(row)
        return row

    def step(self) -> list[EngineRow]:
        """Admit waiting rows, decode one token for every running row; the rows that finished."""
        finished = self._finished = []
        self.step_rows = 0
        with torch.inference_mode(), _autocast(self.model, self.autocast):
            newcomers = self._joining = self._take_waiting()
            if newcomers:
                self._admit(newcomers, finished)
            if self.rows:
                self._decode(finished)
        self._finished, self._joining = [], []
        return finished

    def abort(self) -> list[EngineRow]:
        """Drop every row not handed back yet (running, waiting, joining or finished in a step
        that then failed) and return them: after a failed step, each needs an answer."""
        rows = [*self._finished, *self._joining, *self.rows, *self.waiting]
        rows = list({id(r): r for r in rows}.values())
        self.rows, self.waiting, self._finished, self._joining = [], collections.deque(), [], []
        self.length = 0
        return rows

    def run(self) -> None:
        """Step until every submitted row has finished."""
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------------------ joining

    def _take_waiting(self) -> list[EngineRow]:
        """The waiting rows that join now: oldest first, within the row and prefill budgets."""
        rows: list[EngineRow] = []
        width = 0
        while self.waiting and len(self.rows) + len(rows) < self.max_rows:
            w = max(width, len(self.waiting[0].prompt))
            if rows and w * (len(rows) + 1) > self.prefill_tokens:
                break
            rows.append(self.waiting.popleft())
            width = w
        return rows

    def _admit(self, rows: list[EngineRow], finished: list[EngineRow]) -> None:
        """Prefill ``rows`` together, pick their first tokens, and move the unfinished ones
        into the running cache."""
        model = self.model
        device = model_device(model)
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt):] = True
            if r.settings.temperature > 0:
                r.generator = row_generator(r.settings, device)
        padded = any(len(r.prompt) != width for r in rows)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = _preallocated_cache(model.config, width)
        logits = model(input_ids=ids, attention_mask=mask if padded else None,
                       position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        self.step_rows = len(rows)
        tokens = self._pick(logits, rows)
        keep = [i for i, r in enumerate(rows) if not self._record(r, tokens[i], finished)]
        if not keep:
            return
        self._make_room(len(keep), width, [rows[i] for i in keep], cache)
        n, k = len(self.rows), len(keep)
        index = torch.tensor(keep, dtype=torch.long, device=device)
        lo = self.length - width
        for layer, kb, vb in zip(cache.layers, self._k, self._v):
            kb[n:n + k, :, lo:self.length] = layer.k_buf.index_select(0, index)
            vb[n:n + k, :, lo:self.length] = layer.v_buf.index_select(0, index)
        self._mask[n:n + k] = False
        self._mask[n:n + k, lo:self.length] = mask.index_select(0, index)
        picked = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=device)
        self._tok[n:n + k] = picked
        self._pos[n:n + k] = torch.tensor([len(rows[i].prompt) for i in keep], device=device)
        for i in keep:
            rows[i].start = self.length - len(rows[i].prompt)
            self.rows.append(rows[i])

    def _make_room(self, k: int, width: int, newcomers: list[EngineRow], prefill) -> None:
        """Lay the running cache out so that ``k`` more rows fit, with prompts up to ``width``
        columns ending at ``self.length``, and every row can write all its remaining tokens
        (``prefill``: the newcomers' cache, whose shapes a first allocation copies)."""
        rows = self.rows + newcomers
        ahead = max(r.settings.max_new_tokens - len(r.tokens) for r in rows)
        if not self.rows:
            length, live_lo = width, self.length  # nothing to keep
        else:
            live_lo = min(r.start for r in self.rows)
            length = max(self.length, width)
        slots = self._k[0].shape[0] if self._k else 0
        columns = self._k[0].shape[2] if self._k else 0
        if len(self.rows) + k <= slots and length + ahead <= columns:
            if length != self.length:
                self._move(live_lo, length)  # a longer prompt: shift the running rows right
            return
        # Does dropping dead leading columns make enough room?
        length = max(self.length - live_lo, width) if self.rows else width
        if len(self.rows) + k <= slots and length + ahead <= columns:
            self._move(live_lo, length)
            return
        self._grow(max(slots, self.max_rows, len(self.rows) + k),
                   -(-(length + ahead) // _COLUMN_GRAIN) * _COLUMN_GRAIN, live_lo, length,
                   prefill)

    def _move(self, live_lo: int, length: int) -> None:
        """Move the running rows' live columns ``[live_lo, self.length)`` to end at ``length``,
        in place."""
        n, span = len(self.rows), self.length - live_lo
        shift = length - self.length
        if shift == 0 or n == 0:
            self.length = length
            return
        dst = live_lo + shift
        for buf in (*self._k, *self._v):
            buf[:n, :, dst:dst + span] = buf[:n, :, live_lo:self.length].clone()
        live = self._mask[:n, live_lo:self.length].clone()
        self._mask[:n] = False
        self._mask[:n, dst:dst + span] = live
        for r in self.rows:
            r.start += shift
        self.length = length

    def _grow(self, slots: int, columns: int, live_lo: int, length: int, prefill) -> None:
        """New zeroed buffers of ``slots`` x ``columns``, the running rows' live columns moved
        to end at ``length``."""
        model = self.model
        device = model_device(model)
        n, shift = len(self.rows), length - self.length
        # kv heads, key and value sizes, dtype: from the model's own prefill, not the config
        shapes = [(layer.k_buf.shape[1], layer.k_buf.shape[3], layer.v_buf.shape[3],
                   layer.k_buf.dtype) for layer in prefill.layers]
        new_k, new_v = [], []
        for i, (heads, k_size, v_size, dtype) in enumerate(shapes):
            kb = torch.zeros((slots, heads, columns, k_size), dtype=dtype, device=device)
            vb = torch.zeros((slots, heads, columns, v_size), dtype=dtype, device=device)
            if n:
                kb[:n, :, live_lo + shift:length] = self._k[i][:n, :, live_lo:self.length]
                vb[:n, :, live_lo + shift:length] = self._v[i][:n, :, live_lo:self.length]
            new_k.append(kb)
            new_v.append(vb)
        mask = torch.zeros((slots, columns), dtype=torch.bool, device=device)
        tok = torch.zeros(slots, dtype=torch.long, device=device)
        pos = torch.zeros(slots, dtype=torch.long, device=device)
        if n:
            mask[:n, live_lo + shift:length] = self._mask[:n, live_lo:self.length]
            tok[:n], pos[:n] = self._tok[:n], self._pos[:n]
            for r in self.rows:
                r.start += shift
        self._k, self._v, self._mask, self._tok, self._pos = new_k, new_v, mask, tok, pos
        self.length = length
        if self._cache is None:
            self._cache = DynamicCache(config=model.config)
            self._cache.layers = [_SlotLayer(self, i) for i in range(len(new_k))]

    # ------------------------------------------------------------------------------ decoding

    def _decode(self, finished: list[EngineRow]) -> None:
        n = len(self.rows)
        live_lo = min(r.start for r in self.rows)
        if live_lo >= _COMPACT_MIN and 2 * live_lo >= self.length:
            self._move(live_lo, self.length - live_lo)
        self._mask[:n, self.length] = True
        attn = self._mask[:n, None, None, : self.length + 1]
        logits = self.model(input_ids=self._tok[:n, None], attention_mask=attn,
                            position_ids=self._pos[:n, None], cache=self._cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.length += 1
        self._pos[:n] += 1
        self.step_rows = max(self.step_rows, n)
        tokens = self._pick(logits, self.rows)
        self._tok[:n] = torch.tensor(tokens, dtype=torch.long, device=self._tok.device)
        done = [j for j, r in enumerate(self.rows) if self._record(r, tokens[j], finished)]
        for j in reversed(done):
            self._remove(j)

    def _pick(self, logits: torch.Tensor, rows: list[EngineRow]) -> list[int]:
        sampled = [j for j, r in enumerate(rows) if r.generator is not None]
        if not sampled:
            return logits.argmax(-1).tolist()
        temperature = torch.tensor([rows[j].settings.temperature for j in sampled],
                                   device=logits.device)
        # no nucleus cut: an infinite threshold, as generate_rows does
        top_p = torch.tensor([rows[j].settings.top_p if rows[j].settings.top_p < 1.0
                              else float("inf") for j in sampled], device=logits.device)
        return next_tokens(logits, sampled, temperature, top_p,
                           [rows[j].generator for j in sampled]).tolist()

    @staticmethod
    def _record(row: EngineRow, token: int, finished: list[EngineRow]) -> bool:
        """Append ``token`` to ``row``; True (and the row in ``finished``) when it is done."""
        row.tokens.append(token)
        if token in row.stop_ids or (row.on_token is not None and row.on_token(token)):
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.settings.max_new_tokens:
            row.finish_reason = "length"
        else:
            return False
        finished.append(row)
        return True

    def _remove(self, j: int) -> None:
        """Take slot ``j``'s row out: the last slot's row moves into it."""
        last = len(self.rows) - 1
        if j != last:
            for buf in (*self._k, *self._v):
                buf[j, :, : self.length] = buf[last, :, : self.length]
            self._mask[j] = self._mask[last]
            self._tok[j], self._pos[j] = self._tok[last], self._pos[last]
            self.rows[j] = self.rows[last]
        self.rows.pop()


class _SlotLayer(DynamicLayer):
    """One layer's view of the engine's running cache: a decode step writes each running row's
    keys and values at column ``engine.length`` and attends columns ``[0, length]``."""

    def __init__(self, engine: DecodeEngine, index: int):
        super().__init__()
        self.engine, self.index = engine, index
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        e = self.engine
        n, start = key_states.shape[0], e.length
        end = start + key_states.shape[-2]
        kb, vb = e._k[self.index], e._v[self.index]
        kb[:n, :, start:end] = key_states
        vb[:n, :, start:end] = value_states
        return kb[:n, :, :end], vb[:n, :, :end]

    def get_seq_length(self) -> int:
        return self.engine.length


# ----------------------------------------------------------------------------- rollouts


def generate_continuous(model, tokenizer, conversations: list[list[dict]], *,
                        max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int = 0, max_rows: int | None = None, precision: str = "auto",
                        stop_token_ids: list[int] | None = None) -> list[GenerationResult]:
    """:func:`~tuneforge.generation.generate_batch`'s contract through a :class:`DecodeEngine`:
    the assistant's next turn for each conversation, in the order given.

    Every conversation is submitted at once (longest prompt first, so that neighbours in a
    prefill have similar lengths); ``max_rows`` (default: all, up to 32) run together and a
    finished row's place goes to the next waiting one at the next step. Conversation ``i``
    samples from stream ``i`` of ``seed``, as in ``generate_batch``, so both give the same
    tokens (fp32). The model is in eval mode during the call.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not conversations:
        return []
    prompts, stop_token_ids, pad_id = prepare_prompts(conversations, tokenizer, stop_token_ids)
    run_model, autocast = inference_model(model, precision)
    was_training, run_was_training = model.training, run_model.training
    model.eval()
    run_model.eval()
    engine = DecodeEngine(run_model, stop_token_ids=stop_token_ids, pad_id=pad_id,
                          autocast=autocast, max_rows=max_rows or min(len(prompts), 32))
    try:
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            engine.submit(prompts[i], RowSettings(max_new_tokens, temperature, top_p, seed,
                                                  stream=i), tag=i)
        rows = list(engine.waiting)
        engine.run()
    finally:
        run_model.train(run_was_training)
        model.train(was_training)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for row in rows:
        i = row.tag
        results[i] = GenerationResult(
            text=tokenizer.decode(row.tokens, skip_special_tokens=True).strip(),
            token_ids=row.tokens, num_new_tokens=len(row.tokens),
            finish_reason=row.finish_reason or "length", prompt_tokens=len(prompts[i]),
            prompt_ids=prompts[i])
    return results  # type: ignore[return-value]
