"""Scalar heads on a causal LM's final hidden state: the reward model, and PPO's value head.

Both are ``Linear(hidden, 1)`` in fp32 (:func:`scalar_head`, the same initial weights in every
process and rerun), saved next to the run's adapter/ or model/ as safetensors with ``weight``
``[1, H]`` and ``bias`` ``[1]`` (:func:`save_scalar_head`), and named in its tuneforge.json.

:class:`RewardModel` runs the LM's decoder (plain, or with a PEFT adapter active) and maps the
final hidden state of each sequence's last token through ``Linear(hidden, 1)`` (kept in fp32,
outside any autocast) to one reward. Sequences arrive packed padding-free in one row (with
``seq_lens``, as in training) or as a padded batch with an attention mask.

A reward run (``recipe: reward``) saves its adapter/ or model/ folder as every run does, plus
``reward_head.safetensors`` (``weight`` ``[1, H]``, ``bias`` ``[1]``) in the same folder, named
by ``"reward_head"`` in its ``tuneforge.json``.

Using a trained reward model (for example as the reward of PPO/GRPO rollouts)::

    from tuneforge.models.heads import load_reward_model

    rm = load_reward_model("runs/reward-ranking", device="cpu")
    rewards = rm.score(
        [[{"role": "user", "content": "Where is my order?"}], "Reset my password"],
        ["Department: Shipping\\nReply: ...", "Department: Account Security\\nReply: ..."],
    )  # -> list[float], one per (prompt, response)

``score(prompts, responses)`` takes prompts as message lists (``{"role", "content"}`` dicts, a
system message allowed, ending with the user's turn) or plain strings (one user message), and
responses as the assistant's text (or a list of assistant message dicts). They are rendered with
the chat template exactly as in training. Higher is better; the scale is the one the model
learnt (pairwise and listwise losses fix differences only, so compare rewards, or normalise
them per batch, rather than reading them as absolute values; a regression model's rewards are
on its rating scale). Scoring runs without gradients, in eval mode, in batches of
``batch_size`` sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.data.example import Example, Message
from tuneforge.data.packing import score_packed
from tuneforge.data.render import TokenizedExample, render_response
from tuneforge.errors import ModelLoadError
from tuneforge.models.adapters import base_model

HEAD_FILE = "reward_head.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"


def scalar_head(hidden: int, std: float) -> nn.Linear:
    """``Linear(hidden, 1)`` in fp32: normal weights of ``std`` from a fixed seed, zero bias."""
    head = nn.Linear(hidden, 1, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # the same head for every process and rerun
        torch.manual_seed(0)
        nn.init.normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    return head


def save_scalar_head(head: nn.Linear, folder: Path, filename: str, key: str) -> dict:
    """Write ``head`` as ``folder/filename``; returns its tuneforge.json entries (``key``)."""
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(folder / filename))
    return {key: filename, "hidden_size": head.in_features}


def make_value_head(model: nn.Module) -> nn.Linear:
    """PPO's value head on ``model``'s final hidden states (small weights: values start near 0)."""
    hidden = base_model(model).config.hidden_size
    return scalar_head(hidden, 0.1 * hidden**-0.5)


def save_value_head(head: nn.Linear, folder: Path) -> dict:
    """Write the value head next to the adapter/model; returns its tuneforge.json entries."""
    return save_scalar_head(head, folder, VALUE_HEAD_FILE, "value_head")


class RewardModel(nn.Module):
    """``.model`` (a causal LM, possibly PEFT-wrapped) plus ``.head``, ``Linear(H, 1)`` in fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        base = self.get_base_model()
        self.head = scalar_head(base.config.hidden_size, base.config.hidden_size**-0.5)
        out, inp = base.get_output_embeddings(), base.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            # the vocabulary projection plays no part in a reward; an unused trainable weight
            # would only cost optimizer state (and DDP refuses parameters without gradients)
            out.weight.requires_grad_(False)

    def get_base_model(self) -> nn.Module:
        """The transformers model under any PEFT wrapper (its layers carry the adapters)."""
        return base_model(self.model)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                seq_lens: list[int] | None = None) -> torch.Tensor:
        """Rewards ``[S]``: one per packed sequence (``seq_lens``; ``input_ids`` ``[1, T]``) or
        per row of a padded batch (``attention_mask`` ``[B, L]``, padding on either side).
        ``targets`` is ignored (the signature of every packed-row scorer)."""
        extra = {"packed_seq_lens": seq_lens} if seq_lens is not None else {}
        hidden = self.get_base_model().get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            use_cache=False, **extra).last_hidden_state  # [B, T, H]
        if seq_lens is not None:
            ends = torch.tensor(seq_lens, device=hidden.device).cumsum(0) - 1
            last = hidden[0, ends]
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            ends = mask.shape[-1] - 1 - mask.flip(-1).argmax(-1)  # the last real token of a row
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(last.float()).squeeze(-1)

    def score_packed(self, sequences: Sequence[TokenizedExample], device: torch.device) -> torch.Tensor:
        """Rewards ``[S]`` of tokenized sequences, packed into one row."""
        return score_packed(self, sequences, device)


def save_head(reward_model: RewardModel, folder: Path) -> dict:
    """Write the head's weights into ``folder``; return what tuneforge.json records of them."""
    return save_scalar_head(reward_model.head, folder, HEAD_FILE, "reward_head")


class RewardScorer:
    """A trained reward model ready to score (prompt, response) pairs; see the module docstring."""

    def __init__(self, model: RewardModel, tokenizer, *, batch_size: int = 8,
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str | list[dict]]) -> list[float]:
        """One reward per (prompt, response); see the module docstring for the accepted shapes."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        examples = [_as_example(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.score_sequences([render_response(ex, 0, self.tokenizer, self.max_length)
                                     for ex in examples])

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[TokenizedExample],
                        on_batch: Callable[[int], None] | None = None) -> list[float]:
        """Rewards of already tokenized sequences; ``on_batch(n)`` after each batch of ``n``."""
        rewards: list[float] = []
        for lo in range(0, len(sequences), self.batch_size):
            chunk = sequences[lo : lo + self.batch_size]
            rewards += self.model.score_packed(chunk, self.device).tolist()
            if on_batch is not None:
                on_batch(len(chunk))
        return rewards


def _as_example(i: int, prompt: str | list[dict], response: str | list[dict]) -> Example:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    return Example("<score>", i, "preference",
                   prompt_messages=[Message(m["role"], m["content"]) for m in prompt],
                   responses=[[Message(m["role"], m["content"]) for m in response]])


def load_reward_model(run: str | Path, *, dtype: str = "float32", device: str | torch.device = "cpu",
                      batch_size: int = 8, max_length: int | None = None) -> RewardScorer:
    """Load a reward run (its folder, or the adapter/ or model/ folder in it) for scoring."""
    from tuneforge.models.attention import use_packed_attention
    from tuneforge.models.runs import find_run_output, load_for_inference

    output = find_run_output(Path(run)) if Path(run).is_dir() else None
    if output is None:
        raise ModelLoadError(f"{run}: not a run folder (no adapter/ or model/ with tuneforge.json)")
    meta = json.loads((output / "tuneforge.json").read_text())
    if meta.get("recipe") != "reward" or not (output / meta.get("reward_head", HEAD_FILE)).is_file():
        raise ModelLoadError(f"{run}: not a reward model (trained by the {meta.get('recipe', '?')} "
                             "recipe, no reward head); train one with `tuneforge train "
                             "configs/reward-ranking.yaml`")
    model, tokenizer, _ = load_for_inference(str(output), dtype=dtype)
    reward_model = RewardModel(model)
    weights = load_file(str(output / meta["reward_head"]))
    reward_model.head.load_state_dict(weights)
    use_packed_attention(model)
    reward_model.to(device)
    return RewardScorer(reward_model, tokenizer, batch_size=batch_size, max_length=max_length)
