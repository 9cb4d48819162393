"""The training step's invariants, on a tiny llama built in code (fp32, seconds each)."""

from __future__ import annotations

import pytest
import torch
from helpers import chat_records

from tuneforge.config import AdapterConfig, TrainConfig
from tuneforge.data.example import Example, Message
from tuneforge.data.packing import pack, pad
from tuneforge.data.render import IGNORE_INDEX, render_sft
from tuneforge.errors import DataError
from tuneforge.losses.causal_lm import CausalLMLoss, chunked_target_logps
from tuneforge.models.adapters import prepare_model
from tuneforge.models.loading import load_model
from tuneforge.train.loop import global_batches, train


def examples(n: int = 8) -> list[Example]:
    return [Example("mem", i + 1, "chat", messages=[Message(**m) for m in r["messages"]])
            for i, r in enumerate(chat_records(n))]


def tokenized(n: int = 8):
    _, tok = load_model("tiny:llama")
    return [render_sft(e, tok) for e in examples(n)]


def quiet(**kw) -> TrainConfig:
    base = dict(bf16="false", progress=False, eval_every=0, save_every=0, warmup_steps=0,
                schedule="constant", lr=1e-2, max_grad_norm=None)
    return TrainConfig(**{**base, **kw})


def tiny(method: str = "lora", **adapter):
    model, tok = load_model("tiny:llama")
    cfg = AdapterConfig(method=method, dropout=0.0, **adapter)
    return prepare_model(model, cfg), tok


def test_packed_loss_equals_padded_and_naive_loss():
    model, tok = load_model("tiny:llama")
    data = tokenized(5)
    loss = CausalLMLoss(model, chunk_size=7)  # a small chunk exercises the chunking
    packed, padded = pack(data), pad(data, tok.pad_token_id)
    s_packed, n_packed = loss(packed["input_ids"], packed["targets"], position_ids=packed["position_ids"])
    s_padded, n_padded = loss(padded["input_ids"], padded["targets"], attention_mask=padded["attention_mask"])
    # the naive reference: each example alone, full logits, plain cross-entropy
    naive = 0.0
    for ex in data:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
        naive += torch.nn.functional.cross_entropy(
            logits, torch.tensor(ex.labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum")
    assert n_packed == n_padded == sum(ex.num_targets for ex in data)
    torch.testing.assert_close(s_packed, s_padded, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_packed, naive, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_target_logps_without_saved_logits_match_autograd(bias, bf16):
    """The head projection that keeps no logits for backward gives autograd's values and
    gradients (rows, weight, bias), with per-position upstream gradients as DPO sends them."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    targets = torch.randint(0, 300, (2, 30))
    targets[0, :4] = IGNORE_INDEX
    upstream = torch.randn(int((targets != IGNORE_INDEX).sum()))

    def reference():
        keep = targets != IGNORE_INDEX
        return -torch.nn.functional.cross_entropy(head(hidden[keep]).float(), targets[keep],
                                                  reduction="none")

    results = []
    for fn in (reference, lambda: chunked_target_logps(hidden, head, targets, chunk_size=7)):
        hidden.grad = None
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps = fn()
        (logps * upstream).sum().backward()
        grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        results.append([logps.detach()] + [g.clone() for g in grads])
    # bf16: the same bf16 logits; weight gradients differ by bf16 rounding of per-chunk sums
    tol = dict(rtol=2e-2, atol=5e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, **tol)


def test_packing_resets_positions_per_example():
    data = tokenized(3)
    packed = pack(data)
    starts = [0, len(data[0]), len(data[0]) + len(data[1])]
    assert packed["input_ids"].shape == (1, sum(len(d) for d in data))  # no padding at all
    assert [int(packed["position_ids"][0, s]) for s in starts] == [0, 0, 0]
    # the last token of an example never predicts the next example's first token
    assert [int(packed["targets"][0, s - 1]) for s in starts[1:]] == [IGNORE_INDEX] * 2


def test_chat_mask_covers_exactly_the_assistant_turn_and_its_end_token():
    _, tok = load_model("tiny:llama")
    ex = Example("f", 1, "chat", messages=[Message("system", "Be brief."), Message("user", "Hi?"),
                                           Message("assistant", "Hello."), Message("user", "Bye?"),
                                           Message("assistant", "Bye now.")])
    r = render_sft(ex, tok)
    trained = tok.decode([t if lab != IGNORE_INDEX else tok.pad_token_id
                          for t, lab in zip(r.input_ids, r.labels)], skip_special_tokens=False)
    pieces = [p for p in trained.split("<|endoftext|>") if p]
    assert pieces == ["Hello.<|im_end|>", "Bye now.<|im_end|>"]


def test_weight_zero_turn_is_not_trained():
    _, tok = load_model("tiny:llama")
    ex = Example("f", 1, "chat", messages=[Message("user", "a"), Message("assistant", "skip me", 0),
                                           Message("user", "b"), Message("assistant", "learn me")])
    r = render_sft(ex, tok)
    assert tok.decode([t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX]) \
        == "learn me<|im_end|>"


def test_raw_prompt_completion_mask_and_eos():
    _, tok = load_model("tiny:llama")
    ex = Example("f", 1, "prompt_completion", prompt="James##\n", completion=" name\n###\n")
    r = render_sft(ex, tok)
    assert tok.decode(r.input_ids) == "James##\n name\n###\n<|im_end|>"
    assert tok.decode([t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX]) \
        == " name\n###\n<|im_end|>"


def test_template_without_end_of_turn_token_is_refused():
    _, tok = load_model("tiny:llama")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="mem:1: the end-of-turn token"):
        render_sft(examples(1)[0], tok)


def test_global_batches_cover_each_epoch_once_and_resume_midway():
    stream = global_batches(10, 4, seed=3)
    first = [next(stream) for _ in range(5)]  # 20 examples = 2 epochs
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert list(next(global_batches(10, 4, seed=3, start_step=3))) == first[3]


def _one_step(batch_size: int, grad_accum: int, method: str = "lora"):
    model, _ = tiny(method)
    data = tokenized(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # adam_eps=1 makes the first update ~ lr * gradient (not lr * sign(gradient)), so the
    # comparison tests the accumulated gradient rather than the sign of near-zero entries
    train(model, data, [], quiet(batch_size=batch_size, grad_accum=grad_accum, max_steps=1,
                                 seed=1, adam_eps=1.0, lr=1.0), _run_dir())
    return before, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="tf-test-"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_batch1_accum4_equals_batch4_accum1(method):
    _, a = _one_step(4, 1, method)
    _, b = _one_step(1, 4, method)
    _, c = _one_step(2, 2, method)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,extra", [
    ("lora", {}), ("dora", {}), ("loha", {}), ("lokr", {}), ("ia3", {}), ("full", {}),
    ("freeze", {"trainable_layers": 1}), ("freeze", {"trainable_layers": 1, "train_embeddings": True}),
])
def test_trainable_weights_change_and_frozen_ones_do_not(method, extra):
    model, _ = tiny(method, **extra)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    if method == "freeze":
        assert all(".layers.1." in n or "norm.weight" == n.split("model.")[-1] or "lm_head" in n
                   or (extra.get("train_embeddings") and "embed_tokens" in n) for n in trainable)
        assert not any(".layers.0." in n for n in trainable)
    train(model, tokenized(8), [], quiet(batch_size=4, max_steps=3), _run_dir())
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), start[name])
        assert changed == (name in trainable), f"{name}: changed={changed}"


def test_frozen_weights_get_no_gradient_or_optimizer_state():
    from tuneforge.train.loop import make_optimizer

    model, _ = tiny("lora")
    opt = make_optimizer(model, quiet())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad == ("lora_" in n), n


def test_training_lowers_the_loss():
    model, _ = tiny("full")
    data = tokenized(8)
    result = train(model, data, data, quiet(batch_size=8, max_steps=30, lr=3e-3), _run_dir())
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_early_stopping_restores_the_best_checkpoint():
    model, _ = tiny("full")
    data = tokenized(8)
    run = _run_dir()
    # a huge learning rate makes validation loss blow up after the first evaluations
    result = train(model, data, data[:4], quiet(batch_size=4, max_steps=40, lr=0.3, eval_every=2,
                                                save_every=0, early_stopping_patience=2), run)
    assert result.stopped_early and result.best_step is not None
    evals = [r for r in result.history if "val_loss" in r]
    assert evals[-1]["step"] == result.best_step + 4  # two evaluations of patience
    from tuneforge.train.loop import Accelerator, evaluate
    from tuneforge.train.objectives import CausalLMObjective

    objective = CausalLMObjective(model)
    restored = evaluate(objective, objective.module, data[:4], 4, Accelerator())["loss"]
    assert restored == pytest.approx(result.best_val_loss, rel=1e-5)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert f"step-{result.best_step:06d}" in kept


def test_keep_last_k_plus_best():
    model, _ = tiny("lora")
    run = _run_dir()
    train(model, tokenized(8), [], quiet(batch_size=4, max_steps=7, save_every=1, keep_last=2), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000007"]
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_per_example_packed_attention_matches_padded_loss_and_gradients(arch):
    from tuneforge.models.attention import use_packed_attention

    model, tok = load_model(f"tiny:{arch}")
    data = [render_sft(e, tok) for e in examples(4)]
    padded = pad(data, tok.pad_token_id)
    loss = CausalLMLoss(model)
    ref, _ = loss(padded["input_ids"], padded["targets"], attention_mask=padded["attention_mask"])
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert use_packed_attention(model)
    packed = pack(data)
    got, _ = loss(packed["input_ids"], packed["targets"], position_ids=packed["position_ids"],
                  seq_lens=packed["seq_lens"])
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    # without seq_lens (generation, padded batches) it is plain SDPA with the usual mask
    again, _ = loss(padded["input_ids"], padded["targets"], attention_mask=padded["attention_mask"])
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-4)


def test_cpu_training_attention_runs_in_fp32_under_autocast_and_scoring_stays_bf16():
    """CPU_BACKWARD_FP32: with gradients the packed attention takes fp32 inputs (faster backward
    on the CPU) and gives the fp32 attention's output; without gradients it stays bf16."""
    import tuneforge.models.attention as attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, generator=g, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()

    def run(qq, kk, vv):
        return attention.packed_attention_forward(module, qq, kk, vv, None, packed_seq_lens=[5, 7])[0]

    want = run(q, k, v)  # fp32, autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(q, k, v)
        with torch.no_grad():
            inference = run(q, k, v)
    assert out.dtype == torch.float32 and inference.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
    assert attention.CPU_BACKWARD_FP32


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_update(method):
    """Recomputing activations in backward (train.gradient_checkpointing) changes memory, not
    the step: the same weights after one step, with packed per-example attention."""
    def one_step(checkpointing: bool):
        model, _ = tiny(method)
        train(model, tokenized(8), [], quiet(batch_size=4, max_steps=1, seed=1, adam_eps=1.0,
                                             lr=1.0, gradient_checkpointing=checkpointing), _run_dir())
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = one_step(False), one_step(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_give_the_same_steps_and_are_switched_off_afterwards(monkeypatch):
    """train.compile fuses the decoder layers' work; the update must not change. Two steps of
    different lengths run one dynamic-shape graph; after training the model runs eagerly."""
    from tuneforge.train import compile as compile_module
    from tuneforge.train.compile import decoder_layers

    real_compile, calls = torch.compile, []

    def counted_compile(fn, **kwargs):  # the real compiler; counts the calls of what it returns
        compiled = real_compile(fn, **kwargs)
        return lambda *a, **k: calls.append(1) or compiled(*a, **k)

    monkeypatch.setattr(compile_module.torch, "compile", counted_compile)

    def two_steps(compile_layers: bool):
        model, _ = tiny("lora")
        # adam_eps 1: the update is about lr x gradient, so it compares gradients, not signs
        result = train(model, tokenized(8), [], quiet(batch_size=4, max_steps=2, seed=1, adam_eps=1.0,
                                                      lr=1.0, compile=str(compile_layers).lower()),
                       _run_dir())
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model, [r["loss"] for r in result.history], weights

    _, eager_losses, eager = two_steps(False)
    model, losses, compiled = two_steps(True)
    assert len(calls) == 2 * 2  # two layers, two steps, each through its compiled graph
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(layer._compiled_call_impl is None for layer in layers)



def test_compile_auto_only_for_long_runs_of_large_models():
    from tuneforge.errors import TuneforgeError
    from tuneforge.train.compile import (
        AUTO_MIN_PARAMETERS,
        AUTO_MIN_STEPS,
        compiler_available,
        use_compile,
    )

    cpu = torch.device("cpu")
    small = torch.nn.Linear(4, 4)
    large = torch.nn.Embedding(AUTO_MIN_PARAMETERS // 64 + 1, 64, device="meta")  # counted, not allocated
    have = compiler_available(cpu)[0]
    assert not use_compile("auto", cpu, small, 10 * AUTO_MIN_STEPS)
    assert not use_compile("auto", cpu, large, AUTO_MIN_STEPS - 1)
    assert use_compile("auto", cpu, large, AUTO_MIN_STEPS) is have
    assert not use_compile("false", cpu, large, 10 * AUTO_MIN_STEPS)
    # losses that subtract two passes (DPO against its reference) compile only when asked
    assert not use_compile("auto", cpu, large, 10 * AUTO_MIN_STEPS, auto=False)
    assert use_compile("true", cpu, large, 1, auto=False) is have
    if have:
        assert use_compile("true", cpu, small, 1)
    with pytest.raises(TuneforgeError, match="train.compile=true: .*set train.compile=false"):
        use_compile("true", torch.device("meta"), small, 1)


def test_compiled_layers_run_eagerly_with_a_kv_cache():
    """Sampling (a KV cache) takes the eager path; passes without one, with gradients or
    without (the DPO reference, PPO's old log-probs), take the graph."""
    from tuneforge.train.compile import _unless_cached

    def compiled(x, **kwargs):
        raise AssertionError("compiled path taken")

    call = _unless_cached(lambda x, **kwargs: x + 1, compiled)
    assert call(torch.ones(1), cache=object()).item() == 2.0
    for kwargs in ({}, {"cache": None}):
        with torch.no_grad(), pytest.raises(AssertionError, match="compiled path taken"):
            call(torch.ones(1), **kwargs)
        with pytest.raises(AssertionError, match="compiled path taken"):
            call(torch.ones(1), **kwargs)


def test_release_free_memory_returns_heap_holes_to_the_system():
    """Freed blocks below a live one stay resident until trimmed (the creep the loop trims
    under gradient checkpointing); release_free_memory hands them back."""
    import sys
    from pathlib import Path

    from tuneforge.train.memory import release_free_memory

    if not sys.platform.startswith("linux") or not release_free_memory():
        pytest.skip("needs glibc's malloc_trim")

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each: heap, not mmap
    keep = torch.ones(16 * 1024)  # allocated after them, so they are not at the heap's top
    held = resident_mb()
    del blocks
    before = resident_mb()
    assert release_free_memory()
    after = resident_mb()
    assert before - after > 0.5 * 250, (held, before, after)
    del keep
