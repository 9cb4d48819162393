"""Turning an :class:`Example` into token ids and a loss mask.

Chat examples are rendered with the tokenizer's own chat template, and only the assistant turns
are trained (labels elsewhere are -100). Each trained span ends with the template's end-of-turn
token, so the model learns to stop; :func:`render_sft` refuses an example where that token would
not be trained. Raw prompt/completion examples are concatenated as written, with EOS appended
to the completion.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.example import Example, Message
from tuneforge.errors import DataError

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """``input_ids`` and ``labels`` of one example; labels are -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss once shifted: every trained label but a trained first token."""
        return self.num_trained - (bool(self.labels) and self.labels[0] != IGNORE_INDEX)


def render_sft(
    example: Example,
    tokenizer,
    max_length: int | None = None,
    *,
    train_on_prompt: bool = False,
) -> TokenizedExample:
    """Tokenise one supervised example; raises DataError naming ``file:line`` if it can't.

    ``max_length`` truncates (from the right); checking lengths is the validator's job.
    """
    if example.messages is not None:
        ids, labels = _render_chat(example, tokenizer, train_on_prompt)
    elif example.prompt is not None and example.completion is not None:
        ids, labels = _render_raw(example.prompt, example.completion, tokenizer, train_on_prompt)
    else:
        raise DataError(f"{example.where}: not a supervised example (format {example.format})")
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(ids, labels, example.source, example.line)


def _render_raw(prompt: str, completion: str, tokenizer, train_on_prompt: bool):
    # Tokenised separately so the boundary is exact: a merge across it would blur the mask.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and completion_ids[-1:] != [tokenizer.eos_token_id]:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return list(prompt_ids) + completion_ids, prompt_labels + completion_ids


def _render_chat(example: Example, tokenizer, train_on_prompt: bool):
    """Render with the chat template; label the characters of each trained assistant turn.

    The span of assistant turn i is found by rendering the conversation up to the turn before
    it (with the generation prompt) and up to the turn itself: the text in between is what the
    model must produce, end-of-turn token included. Trailing whitespace after that token is not
    trained (generation stops at the token).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{example.where}: chat-format data needs a tokenizer with a chat template; "
            "this model's tokenizer has none (use prompt/completion data, or a chat model)"
        )
    messages = [_as_dict(m) for m in example.messages]
    text = _apply(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(example.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        start = len(_apply(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_apply(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if text[:end] != _apply(tokenizer, messages[: i + 1], add_generation_prompt=False):
            raise DataError(
                f"{example.where}: the chat template does not render turns as a prefix of the "
                "whole conversation, so assistant turns cannot be masked"
            )
        segment = text[start:end]
        spans.append((start, start + len(segment.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (lo, _hi) in enumerate(enc["offset_mapping"]):
        if train_on_prompt or any(s <= lo < e for s, e in spans):
            labels[t] = ids[t]
    _check_stop_token_trained(example, tokenizer, ids, labels, spans)
    return ids, labels


def _check_stop_token_trained(example, tokenizer, ids, labels, spans) -> None:
    """Each trained turn must end in a trained end-of-turn token, or the model never learns to stop."""
    if not spans:
        return
    stop_ids = {tokenizer.eos_token_id} | set(_end_of_turn_ids(tokenizer))
    trained_stops = sum(1 for t, lab in zip(ids, labels) if lab != IGNORE_INDEX and t in stop_ids)
    if trained_stops < len(spans):
        raise DataError(
            f"{example.where}: the end-of-turn token ({tokenizer.eos_token!r}) is not among the "
            "trained labels of every assistant turn, so the model would not learn to stop; "
            "check the tokenizer's chat template and eos_token"
        )


def _end_of_turn_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.append(tid)
    return ids


def _apply(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _as_dict(message: Message) -> dict:
    return {"role": message.role, "content": message.content}


def render_prompt(messages: list[Message] | list[dict], tokenizer) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (for generation and scoring)."""
    as_dicts = [m if isinstance(m, dict) else _as_dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = _apply(tokenizer, as_dicts, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in as_dicts)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def render_response(example: Example, index: int, tokenizer,
                    max_length: int | None = None) -> TokenizedExample:
    """The prompt of a preference/ranking example followed by its ``index``-th response.

    Only the response is trained (scored): assistant turns inside the prompt get weight 0.
    """
    prompt = [Message(m.role, m.content, 0.0 if m.role == "assistant" else m.weight)
              for m in example.prompt_messages or []]
    messages = prompt + list(example.responses[index])
    as_chat = Example(example.source, example.line, "chat", messages=messages)
    return render_sft(as_chat, tokenizer, max_length)
