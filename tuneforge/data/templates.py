"""Task templates: one definition of a task's prompt, used by training and by inference alike.

A :class:`~tuneforge.config.TemplateConfig` rewrites each record before anything else sees it
(:func:`apply_template`): a classification record ``{"text": ..., "label": ...}`` may become
a system message, a user turn ``"Ticket: {text}"`` and an answer ``"Department: {label}"``.
Training renders the result with :func:`~tuneforge.data.render.render_sft`; evaluation and
scoring split the same record into the prompt the model sees and the reference answer
(:func:`prompt_and_reference`) and tokenise that prompt with :func:`prompt_ids`.
:func:`check_template_roundtrip` proves the two agree token for token: the inference prompt
must be exactly the tokens that precede the first trained answer token in training.
"""

from __future__ import annotations

import string
from dataclasses import replace

from tuneforge.config import TemplateConfig
from tuneforge.data.example import Example, Message
from tuneforge.data.render import IGNORE_INDEX, render_prompt, render_sft
from tuneforge.errors import DataError

Prompt = list[dict] | str
"""What a model is asked: chat messages (rendered with the chat template) or raw text."""


def is_identity(template: TemplateConfig | None) -> bool:
    """True when the template changes nothing (every part unset)."""
    return template is None or all(
        getattr(template, k) is None for k in ("system", "user", "assistant", "prompt", "completion")
    )


def record_fields(example: Example) -> dict[str, str]:
    """The names a template may use for this example (see TemplateConfig)."""
    prompt, reference = prompt_and_reference(example)
    user = prompt if isinstance(prompt, str) else next(
        (m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    fields = {k: v if isinstance(v, str) else str(v) for k, v in example.extra.items()}
    fields.update(input=user, output=reference)
    if example.label is not None:
        fields.update(text=user, label=example.label)
    return fields


def apply_template(example: Example, template: TemplateConfig | None) -> Example:
    """``example`` rewritten by ``template``; raises DataError naming file:line and the part."""
    if is_identity(template):
        return example
    if (template.prompt is None) != (template.completion is None):
        raise DataError("template: prompt and completion go together (raw text without the chat "
                        "template); for chat use system/user/assistant")
    fields = record_fields(example)
    fill = {part: _format(example, part, getattr(template, part), fields)
            for part in ("system", "user", "assistant", "prompt", "completion")
            if getattr(template, part) is not None}
    if "prompt" in fill:
        return replace(example, format="prompt_completion", messages=None,
                       prompt=fill["prompt"], completion=fill["completion"])
    messages = _messages_of(example)
    if ("user" in fill or "assistant" in fill) and sum(m.role == "user" for m in messages) > 1:
        raise DataError(f"{example.where}: template.user/assistant apply to single-turn records; "
                        "this conversation has several user turns (set only template.system)")
    turns = [m for m in messages if m.role != "system"]
    if "system" in fill:
        system = [Message("system", fill["system"])]
    else:
        system = [m for m in messages if m.role == "system"]
    if "user" in fill or "assistant" in fill:
        user = fill.get("user", fields["input"])
        turns = [Message("user", user), Message("assistant", fill.get("assistant", fields["output"]))]
    return replace(example, messages=system + turns, prompt=None, completion=None)


def _messages_of(example: Example) -> list[Message]:
    if example.messages is not None:
        return list(example.messages)
    # raw prompt/completion turned into chat by a system/user/assistant template
    return [Message("user", example.prompt or ""), Message("assistant", example.completion or "")]


def _format(example: Example, part: str, text: str, fields: dict[str, str]) -> str:
    names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    missing = [n for n in names if n not in fields]
    if missing:
        known = ", ".join(sorted(fields))
        raise DataError(f"{example.where}: template.{part}: no field {{{missing[0]}}} in this "
                        f"record (known: {known}; write {{{{ and }}}} for literal braces)")
    try:
        return text.format(**fields)
    except (ValueError, IndexError) as err:
        raise DataError(f"template.{part}: not a valid format string ({err}): {text!r}") from err


def prompt_and_reference(example: Example) -> tuple[Prompt, str]:
    """What the model is asked at inference (everything before the last answer) and that answer.

    Chat examples give the messages before the last assistant turn (as dicts); raw examples the
    prompt text. Raises DataError for records that are not supervised examples.
    """
    if example.messages is not None:
        last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"),
                   default=None)
        if last is None:
            raise DataError(f"{example.where}: no assistant turn to evaluate against")
        prompt = [{"role": m.role, "content": m.content} for m in example.messages[:last]]
        return prompt, example.messages[last].content
    if example.prompt is not None and example.completion is not None:
        return example.prompt, example.completion
    raise DataError(f"{example.where}: a {example.format} record is not a prompt and an answer")


def prompt_ids(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of an inference prompt, exactly as training tokenises the same prompt."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return render_prompt(prompt, tokenizer)


def check_template_roundtrip(example: Example, tokenizer) -> None:
    """Raise DataError unless the inference prompt is what training puts before the answer.

    The training tokens of ``example`` (chat template, masks) must start with the inference
    prompt's tokens, and the answer's first token must be trained. A chat template that renders
    the generation prompt differently from a finished conversation, or a tokenizer that merges
    across the prompt/answer boundary, would otherwise train one prompt and test another.
    """
    train = render_sft(example, tokenizer)
    prompt, _ = prompt_and_reference(example)
    ids = prompt_ids(prompt, tokenizer)
    n = len(ids)
    if train.input_ids[:n] == ids and n < len(train.labels) and train.labels[n] != IGNORE_INDEX:
        return
    at = next((i for i, (a, b) in enumerate(zip(train.input_ids, ids)) if a != b), min(n, len(train)))
    seen = tokenizer.decode(train.input_ids[max(0, at - 8) : at + 8])
    asked = tokenizer.decode(ids[max(0, at - 8) : at + 8])
    raise DataError(
        f"{example.where}: the training text and the inference prompt differ at token {at}: "
        f"training has {seen!r}, inference would send {asked!r}; the chat template or the "
        "task template renders the prompt differently in the two places"
    )
