"""Batched, KV-cached generation on tiny models: it must give what model.generate gives."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.render import render_prompt
from tuneforge.generation import generate_batch, generate_reply
from tuneforge.models.loading import load_model

# Prompts of very different lengths, so a batch is left-padded by up to ~150 tokens.
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Tell me about the weather in a long sentence " * 3}],
    [{"role": "user", "content": "ok?"}],
    [{"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"},
     {"role": "user", "content": "and then what happened next, and why?"}],
]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llama")


def reference(model, tokenizer, messages, max_new_tokens, eos=None):
    """model.generate on one prompt, greedy, fp32: the new tokens."""
    ids = torch.tensor([render_prompt(messages, tokenizer)])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, top_k=None, eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("batch_size", [None, 2, 1])
def test_greedy_batch_equals_generate_one_at_a_time(tiny, batch_size):
    model, tok = tiny
    want = [reference(model, tok, c, 24) for c in CONVERSATIONS]
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=24, precision="fp32",
                         batch_size=batch_size)
    assert [r.token_ids for r in got] == want
    for r, c in zip(got, CONVERSATIONS):
        assert r.num_new_tokens == len(r.token_ids) == 24
        assert r.finish_reason == "length"
        assert r.prompt_tokens == len(render_prompt(c, tok))
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True).strip()


def stop_token_for(want: list[list[int]]) -> int:
    """A token that ends some rows early, at different steps, and never appears in others."""
    counts: dict[int, int] = {}
    for ids in want:
        for t in set(ids[:20]):
            counts[t] = counts.get(t, 0) + 1
    best = [t for t, n in counts.items() if 1 < n < len(want)] or list(counts)
    return max(best, key=lambda t: (counts[t], -t))


def test_each_row_stops_at_its_stop_token(tiny):
    model, tok = tiny
    free = [reference(model, tok, c, 24) for c in CONVERSATIONS]
    stop = stop_token_for(free)
    want = [reference(model, tok, c, 24, eos=stop) for c in CONVERSATIONS]
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=24, precision="fp32",
                         stop_token_ids=[stop])
    assert [r.token_ids for r in got] == want
    reasons = [r.finish_reason for r in got]
    assert "stop" in reasons and "length" in reasons
    for r in got:
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == stop and stop not in r.token_ids[:-1]
            assert r.num_new_tokens < 24
        else:
            assert stop not in r.token_ids and r.num_new_tokens == 24


def test_stops_at_tokenizer_eos_by_default(tiny):
    model, tok = load_model("tiny:llama")  # its own tokenizer: we change its EOS
    free = [reference(model, tok, c, 24) for c in CONVERSATIONS]
    stop = stop_token_for(free)
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    assert tok.eos_token_id == stop
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=24, precision="fp32")
    assert [r.token_ids for r in got] == [reference(model, tok, c, 24) for c in CONVERSATIONS]
    assert any(r.finish_reason == "stop" for r in got)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_respected(tiny, n):
    model, tok = tiny
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=n, precision="fp32")
    assert [r.num_new_tokens for r in got] == [n] * len(CONVERSATIONS)
    assert [r.token_ids for r in got] == [reference(model, tok, c, n) for c in CONVERSATIONS]


def test_sampling_is_reproducible_and_independent_of_batching(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a = [r.token_ids for r in generate_batch(model, tok, CONVERSATIONS, **kw)]
    b = [r.token_ids for r in generate_batch(model, tok, CONVERSATIONS, batch_size=2, **kw)]
    c = [r.token_ids for r in generate_batch(model, tok, CONVERSATIONS, **{**kw, "seed": 4})]
    assert a == b
    assert a != c
    # Identical prompts still get different samples (one random stream per conversation).
    same = generate_batch(model, tok, [CONVERSATIONS[0]] * 2, **kw)
    assert same[0].token_ids != same[1].token_ids


def test_tiny_top_p_is_greedy(tiny):
    model, tok = tiny
    greedy = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=12, precision="fp32")
    nucleus = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=12, precision="fp32",
                             temperature=0.7, top_p=1e-6)
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_bf16_runs_and_leaves_the_model_alone(tiny):
    model, tok = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=8, precision="bf16")
    assert all(r.num_new_tokens == 8 for r in got)
    assert model.training
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The bf16 copy follows the weights: change them and the output changes with them.
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    again = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=8, precision="bf16")
    assert [r.token_ids for r in again] != [r.token_ids for r in got]


def test_lora_peft_model():
    from peft import LoraConfig, get_peft_model

    base, tok = load_model("tiny:llama")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))
    model.train()  # as during training: generation must run without adapter dropout
    want = [reference(model, tok, c, 16) for c in CONVERSATIONS]
    model.train()
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=16, precision="fp32")
    assert [r.token_ids for r in got] == want
    assert model.training
    # The adapter changes the output (so the test above is not just the base model's).
    with model.disable_adapter():
        plain = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=16, precision="fp32")
    assert [r.token_ids for r in plain] != want
    # bf16 runs a merged copy; the PeftModel itself keeps its adapter unmerged.
    merged = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=16, precision="bf16")
    assert all(r.num_new_tokens == 16 for r in merged)
    assert any(n.endswith("lora_A.default.weight") for n, _ in model.named_parameters())


def test_generate_reply_matches_model_generate_in_fp32(tiny):
    model, tok = tiny
    for c in CONVERSATIONS:
        ids = reference(model, tok, c, 20)
        want = tok.decode(ids, skip_special_tokens=True).strip()
        assert generate_reply(model, tok, c, max_new_tokens=20, precision="fp32") == want
    # The default (bf16 where native) gives a reply too.
    assert isinstance(generate_reply(model, tok, CONVERSATIONS[0], max_new_tokens=5), str)


def test_empty_and_bad_arguments(tiny):
    model, tok = tiny
    assert generate_batch(model, tok, []) == []
    with pytest.raises(ValueError):
        generate_batch(model, tok, CONVERSATIONS, precision="fp8")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_transformers_caches_give_the_same_greedy_output(tiny, cache):
    model, tok = tiny
    want = [reference(model, tok, c, 12) for c in CONVERSATIONS]
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=12, precision="fp32", cache=cache)
    assert [r.token_ids for r in got] == want


def test_compile_failure_falls_back_to_eager(tiny, monkeypatch):
    from tuneforge.generation import decode

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    model, tok = load_model("tiny:llama")
    monkeypatch.setattr(decode.torch, "compile", broken)
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=10, precision="fp32",
                         compile=True)
    assert [r.token_ids for r in got] == [reference(model, tok, c, 10) for c in CONVERSATIONS]
    assert model in decode.COMPILE_FAILED


# ------------------------------------------------------------------ bf16 copy and int4 packing


def snap_to_grid(model, bits: int = 4) -> None:
    """Round every linear weight of ``model`` onto a GGUF-like grid, in place: Q4_1 (16 levels
    between each group of 32's min and max) or Q8_0 (multiples -127..127 of amax / 127)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.shape[0] % 16 == 0:
                n, k = module.weight.shape
                w = module.weight.view(n, k // 32, 32)
                if bits == 4:
                    low = w.amin(-1, keepdim=True)
                    step = (w.amax(-1, keepdim=True) - low) / 15
                    w.copy_(((w - low) / step).round() * step + low)
                else:
                    step = w.abs().amax(-1, keepdim=True) / 127
                    w.copy_((w / step).round() * step)


def logits(model, tok, messages):
    ids = torch.tensor([render_prompt(messages, tok)])
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


@pytest.mark.parametrize("bits,parts", [(4, 1), (8, 2)])
def test_linear_layers_on_a_4_or_8_bit_grid_are_packed_exactly(bits, parts):
    from tuneforge.generation.inference_copy import InferenceLinear, bf16_copy, int4_available

    if not int4_available(torch.device("cpu")):
        pytest.skip("no int4 CPU kernels in this torch")
    model, tok = load_model("tiny:llama")
    snap_to_grid(model, bits)
    fast = bf16_copy(model)
    layers = [m for m in fast.modules() if isinstance(m, InferenceLinear)]
    assert {len(m.int4_parts) for m in layers if m.out_features % 16 == 0} == {parts}
    assert all(not m.int4_parts for m in layers if m.out_features % 16)  # lm_head: 259 rows
    # Packed (few rows) and bf16 (many rows) agree with fp32 to bf16 accuracy.
    layer = fast.model.layers[0].mlp.down_proj
    ref = model.model.layers[0].mlp.down_proj
    for rows in (1, layer.int4_max_rows, layer.int4_max_rows + 1):
        x = torch.randn(rows, layer.in_features)
        want = ref(x)
        assert torch.allclose(layer(x), want, atol=0.02 * want.abs().max().item())
    # Whole-model logits match fp32 to bf16 accuracy.
    for c in CONVERSATIONS[:2]:
        a, b = logits(model, tok, c), logits(fast, tok, c)
        assert (a - b).abs().max() < 0.05 * a.abs().max()
    got = generate_batch(model, tok, CONVERSATIONS, max_new_tokens=8, precision="bf16")
    assert all(r.num_new_tokens == 8 for r in got)


def test_off_grid_weights_are_not_packed():
    from tuneforge.generation.inference_copy import InferenceLinear, bf16_copy

    model, _ = load_model("tiny:llama")
    fast = bf16_copy(model)
    assert not any(m.int4_parts for m in fast.modules() if isinstance(m, InferenceLinear))


def lora_on_a_packed_base():
    """(tiny model on a 4-bit grid with a random LoRA adapter on every linear layer, tokenizer),
    in eval mode; skips where torch has no int4 CPU kernels."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.generation.inference_copy import int4_available

    if not int4_available(torch.device("cpu")):
        pytest.skip("no int4 CPU kernels in this torch")
    base, tok = load_model("tiny:llama")
    snap_to_grid(base, 4)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))
    return model.eval(), tok


def test_lora_on_a_packed_base_runs_unmerged_and_follows_disable_adapter():
    from tuneforge.generation.inference_copy import InferenceLinear, inference_model

    model, tok = lora_on_a_packed_base()
    fast, _ = inference_model(model, "bf16")
    branches = [m for m in fast.modules() if isinstance(m, InferenceLinear) and m.lora]
    assert branches and all(m.int4_parts for m in branches)
    assert inference_model(model, "bf16")[0] is fast  # reused while nothing changes
    for c in CONVERSATIONS[:2]:
        a, b = logits(model, tok, c), logits(fast, tok, c)
        assert (a - b).abs().max() < 0.05 * a.abs().max()
    with model.disable_adapter():
        plain, _ = inference_model(model, "bf16")
        assert plain is not fast
        assert not any(m.lora for m in plain.modules() if isinstance(m, InferenceLinear))
    assert inference_model(model, "bf16")[0] is not plain


def test_an_optimizer_step_on_lora_refreshes_the_unmerged_copy_in_place():
    """After a LoRA update the copy takes the new adapter tensors (what rollouts need after
    every step) and gives exactly what a copy made from scratch gives; a change outside the
    adapter still makes a new copy."""
    from tuneforge.generation.inference_copy import bf16_copy, inference_model

    model, tok = lora_on_a_packed_base()
    fast, _ = inference_model(model, "bf16")
    before = logits(fast, tok, CONVERSATIONS[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([render_prompt(CONVERSATIONS[1], tok)])
    model(input_ids=ids).logits.square().mean().backward()
    optimizer.step()
    again, _ = inference_model(model, "bf16")
    assert again is fast  # refreshed, not made again
    after = logits(again, tok, CONVERSATIONS[0])
    assert (after - before).abs().max() > 1e-3  # the update shows
    assert torch.equal(after, logits(bf16_copy(model), tok, CONVERSATIONS[0]))
    with torch.no_grad():
        model.get_base_model().model.norm.weight.mul_(1.5)  # outside the adapter
    assert inference_model(model, "bf16")[0] is not fast


def test_rows_with_their_own_settings_match_each_row_alone(tiny):
    """A server batch mixes greedy and sampled rows with their own limits and seeds: each row
    gives what it gives alone."""
    from tuneforge.generation import RowSettings, generate_rows

    model, tok = tiny
    prompts = [render_prompt(c, tok) for c in CONVERSATIONS]
    settings = [RowSettings(max_new_tokens=5 + 3 * i, temperature=0.9 * (i % 2), top_p=0.8,
                            seed=11 * i) for i in range(len(prompts))]
    kw = {"stop_token_ids": [tok.eos_token_id], "pad_id": tok.pad_token_id}
    together = generate_rows(model.eval(), prompts, settings, **kw)
    alone = [generate_rows(model, [p], [s], **kw)[0] for p, s in zip(prompts, settings)]
    assert together == alone
    assert [len(ids) for ids, _ in together] == [s.max_new_tokens for s in settings]
    assert together[0][0] == reference(model, tok, CONVERSATIONS[0], 5)  # greedy row


def test_token_callback_finishes_a_row(tiny):
    from tuneforge.generation import RowSettings, generate_rows

    model, tok = tiny
    prompts = [render_prompt(c, tok) for c in CONVERSATIONS[:3]]
    seen: list[tuple[int, int]] = []

    def on_token(row: int, token: int) -> bool:
        seen.append((row, token))
        return row == 1 and sum(r == 1 for r, _ in seen) == 3  # row 1 stops after 3 tokens

    got = generate_rows(model.eval(), prompts, [RowSettings(max_new_tokens=8)] * 3,
                        stop_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                        on_token=on_token)
    assert [len(ids) for ids, _ in got] == [8, 3, 8]
    assert [reason for _, reason in got] == ["length", "stop", "length"]
    assert sorted(seen) == sorted((r, t) for r, (ids, _) in enumerate(got) for t in ids)
