"""The normalised record every data format is read into.

Whatever the file looked like (prompt/completion, chat messages, alpaca, classification,
preference pairs, rankings, ratings, unpaired thumbs up/down), the rest of tuneforge sees
:class:`Example`. ``source`` and ``line`` stay attached so any later problem (too long after
templating, say) can still be reported as ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Message:
    """One chat turn. ``weight`` 0 excludes an assistant turn from the loss (OpenAI style)."""

    role: str
    content: str
    weight: float | None = None


@dataclass
class Example:
    """One record, normalised.

    Supervised examples use either ``messages`` (rendered with the tokenizer's chat template)
    or ``prompt`` + ``completion`` (raw text, concatenated as is: the classic separator style).
    Preference pairs and rankings use ``prompt_messages`` plus ``responses`` (each response
    is the list of assistant messages that follows the prompt), best first. A rating is one
    response with its rating in ``scores`` (``[4.0]``); an unpaired example (KTO) is one
    response with ``desirable`` True (thumbs up) or False.
    """

    source: str
    line: int
    format: str
    messages: list[Message] | None = None
    prompt: str | None = None
    completion: str | None = None
    label: str | None = None
    prompt_messages: list[Message] | None = None
    responses: list[list[Message]] | None = None
    scores: list[float] | None = None
    desirable: bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"sft"``, ``"preference"`` (two responses), ``"ranking"`` (two or more, ranked),
        ``"rating"`` (one response, rated), ``"unpaired"`` (one response, thumbs up/down) or
        ``"prompt"`` (a prompt alone, from :func:`~tuneforge.data.formats.load_prompts`)."""
        if self.format in ("rating", "unpaired", "prompt"):
            return self.format
        if self.responses is not None:
            return "preference" if self.format == "preference" else "ranking"
        return "sft"

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"
