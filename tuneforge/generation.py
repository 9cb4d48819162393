"""Text generation for `tuneforge generate` and `tuneforge chat`."""

from __future__ import annotations

import torch

from tuneforge.data.render import render_prompt


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The assistant's next turn after ``messages``, stopping at the end-of-turn token."""
    ids = torch.tensor([render_prompt(messages, tokenizer)])
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
