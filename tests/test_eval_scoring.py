"""Packed label scoring: the same scores as the plain one-prompt-at-a-time reference.

The packed scorer puts several prompts and every candidate of each into one row, with the
candidates as branches of a token tree; these tests hold it to the reference path
(:func:`score_continuations`) in fp32 on prompts of every shape evaluation builds.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.templates import prompt_ids
from tuneforge.eval.classify import (
    LabelTree,
    SharedPrefix,
    bf16_weights,
    candidate_ids,
    candidate_ids_batch,
    classify,
    label_batches,
    score_continuations,
    score_packed,
)
from tuneforge.models.loading import load_model

SYSTEM = {"role": "system", "content": "Route the ticket: Billing, Bill Pay, Sales or Returns. " * 2}
SHOTS = [{"role": "user", "content": "refund please"}, {"role": "assistant", "content": "Returns"},
         {"role": "user", "content": "my invoice is wrong"}, {"role": "assistant", "content": "Billing"}]
# different lengths, one a prefix of another ("Bill" / "Billing" / "Bill Pay"), with and without
# a closing suffix, so that the tree has shared starts, inner candidate ends and lone branches
LABELS = ["Billing\n", "Bill", "Bill Pay\n", "Sales\n", "Returns<|im_end|>", "B"]


def chat_prompts(few_shot: bool) -> list[list[dict]]:
    turns = [SYSTEM, *SHOTS] if few_shot else [SYSTEM]
    return [[*turns, {"role": "user", "content": f"ticket {i}: " + "card charged twice " * (i % 4)}]
            for i in range(7)]


RAW_PROMPTS = [f"Ticket: parcel {i} late{'!' * i}\nTeam:" for i in range(5)]


def tokenised(tok, prompts, candidates):
    pairs = [candidate_ids(tok, p, candidates) for p in prompts]
    return [p for p, _ in pairs], [c for _, c in pairs]


def reference(model, ids, conts) -> list[list[float]]:
    return [score_continuations(model, p, c, bf16=False) for p, c in zip(ids, conts)]


def assert_close(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == [pytest.approx(x, abs=tol) for x in w]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny:llama")
    return model.eval(), tok


def test_label_tree_runs_shared_starts_once_and_scores_every_path():
    tree = LabelTree.of([[5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 7, 1]])
    # inner nodes: 5, 5>6, 5>6>7 (each has a successor); 8, 9 and 1 are last tokens only
    assert tree.tokens == [5, 6, 7] and tree.parents == [-1, 0, 1] and tree.depths == [0, 1, 2]
    assert tree.targets == [(-1, 5), (0, 6), (1, 7), (0, 8), (-1, 9), (2, 1)]
    assert tree.paths == [[0, 1, 2], [0, 1], [0, 3], [4], [0, 1, 2, 5]]
    mask = tree.mask(prompt=2, prefix=1)
    assert mask.tolist() == [
        # prefix, prompt (2), then the inner nodes 5, 6, 7
        [True, True, False, False, False, False],
        [True, True, True, False, False, False],
        [True, True, True, True, False, False],
        [True, True, True, True, True, False],
        [True, True, True, True, True, True],
    ]
    siblings = LabelTree.of([[1, 2, 3], [4, 5, 6]]).mask(prompt=1)
    # inner nodes 1, 1>2, 4, 4>5: a branch sees its own ancestors, never the other branch
    assert siblings[1:, 1:].tolist() == [[True, False, False, False], [True, True, False, False],
                                         [False, False, True, False], [False, False, True, True]]
    assert siblings[:, :1].all()


@pytest.mark.parametrize("few_shot", [False, True])
def test_packed_scores_equal_the_reference_on_chat_prompts(tiny, few_shot):
    model, tok = tiny
    ids, conts = tokenised(tok, chat_prompts(few_shot), LABELS)
    want = reference(model, ids, conts)
    shared = SharedPrefix.of(model, ids, bf16=False)
    assert shared is not None and len(shared.ids) > (100 if few_shot else 30)
    for prefix in (None, shared):
        for group_tokens in (1, 60, 100_000):  # a prompt per row, a few per row, all in one
            assert_close(score_packed(model, ids, conts, bf16=False, shared=prefix,
                                      group_tokens=group_tokens), want)
    assert model.config._attn_implementation == "sdpa"  # switched back after scoring


def test_packed_scores_equal_the_reference_on_raw_prompts(tiny):
    model, tok = tiny
    ids, conts = tokenised(tok, RAW_PROMPTS, [" shipping<|im_end|>", " ship<|im_end|>", " billing"])
    want = reference(model, ids, conts)
    assert_close(score_packed(model, ids, conts, bf16=False, group_tokens=40), want)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_packed_scores_equal_the_reference_on_other_architectures(arch):
    model, tok = load_model(f"tiny:{arch}")
    model.eval()
    ids, conts = tokenised(tok, chat_prompts(True)[:4], LABELS)
    shared = SharedPrefix.of(model, ids, bf16=False)
    got = score_packed(model, ids, conts, bf16=False, shared=shared, group_tokens=200)
    assert_close(got, reference(model, ids, conts))


def test_packed_scores_of_a_lora_model_equal_the_reference():
    from peft import LoraConfig, get_peft_model

    model, tok = load_model("tiny:llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter changes the scores
    peft_model = get_peft_model(model, config).eval()
    ids, conts = tokenised(tok, chat_prompts(False)[:4], LABELS)
    want = reference(peft_model, ids, conts)
    with peft_model.disable_adapter():
        base = reference(peft_model, ids, conts)
    assert abs(want[0][0] - base[0][0]) > 1e-3
    assert_close(score_packed(peft_model, ids, conts, bf16=False), want)


def test_batches_hold_whole_prompts_by_length_and_never_mix_prefixed_with_unprefixed(tiny):
    model, tok = tiny
    prompts = [*chat_prompts(True)[:3], [{"role": "user", "content": "no system here"}]]
    ids, conts = tokenised(tok, prompts, LABELS)
    shared = SharedPrefix.of(model, ids[:3], bf16=False)  # the last prompt does not start with it
    batches = label_batches(ids, conts, shared, group_tokens=100_000)
    assert [b.prefix for b in batches] == [len(shared.ids), 0]
    assert [sorted(b.order) for b in batches] == [[0, 1, 2], [3]]
    first = batches[0]
    assert first.lengths == sorted(first.lengths)  # shortest first: little padding
    assert len(first.ids) == sum(first.lengths)  # the row itself has no padding
    assert first.mask.shape == (3, 1, max(first.lengths), len(shared.ids) + max(first.lengths))
    # a padding query sees key 0 only; real queries see the whole prefix
    short = first.lengths[0]
    assert first.mask[0, 0, short:].sum(-1).tolist() == [1] * (max(first.lengths) - short)
    assert first.mask[:, 0, :, : len(shared.ids)].all(-1)[0, :short].all()
    small = label_batches(ids, conts, shared, group_tokens=1)  # one prompt each
    assert sorted(i for b in small for i in b.order) == [0, 1, 2, 3]
    got = score_packed(model, ids, conts, bf16=False, shared=shared)
    assert_close(got, reference(model, ids, conts))


def one_at_a_time(tok, prompt, candidates):
    """Each answer tokenised after its prompt on its own call, as training tokenises it."""
    ids = prompt_ids(prompt, tok)
    if isinstance(prompt, str):
        return ids, [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]
    text, conts = tok.decode(ids, skip_special_tokens=False), []
    for c in candidates:
        joint = tok(text + c, add_special_tokens=False)["input_ids"]
        ok = joint[: len(ids)] == ids and len(joint) > len(ids)
        conts.append(joint[len(ids):] if ok else tok(c, add_special_tokens=False)["input_ids"])
    return ids, conts


def test_batched_tokenising_equals_one_prompt_at_a_time(tiny):
    _, tok = tiny
    prompts = [*chat_prompts(True), *RAW_PROMPTS, [{"role": "user", "content": "x"}]]
    for candidates in (LABELS, [" shipping<|im_end|>", "ship", " billing"]):
        want = [one_at_a_time(tok, p, candidates) for p in prompts]
        assert candidate_ids_batch(tok, prompts, candidates) == want
        assert [candidate_ids(tok, p, candidates) for p in prompts] == want


def testbf16_weights_give_autocast_scores_and_put_the_fp32_weights_back(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model("tiny:llama")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                             init_lora_weights=False)).eval()
    ids, conts = tokenised(tok, chat_prompts(True)[:3], LABELS)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    want = [score_continuations(model, p, c, bf16=True) for p, c in zip(ids, conts)]
    with bf16_weights(model, True):
        assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        got = [score_continuations(model, p, c, bf16=True) for p, c in zip(ids, conts)]
    assert got == want  # the same bf16 values autocast casts to: the same scores, exactly
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == before
    with bf16_weights(model, False):  # fp32 scoring leaves the weights alone
        assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_classify_packed_gives_the_reference_predictions_and_metrics(tiny):
    model, tok = tiny
    model.train()
    prompts = chat_prompts(True) + chat_prompts(False)
    labels = ["Billing", "Bill", "Sales", "Returns"]
    gold = [labels[i % 4] for i in range(len(prompts))]
    seen = []
    fast = classify(model, tok, prompts, gold, labels, suffix="\n", bf16=False, progress=seen.append)
    plain = classify(model, tok, prompts, gold, labels, suffix="\n", bf16=False, packed=False)
    assert fast.predicted == plain.predicted and fast.metrics() == plain.metrics()
    assert seen[-1] == len(prompts) and seen == sorted(seen)
    assert model.training  # restored
    assert model.config._attn_implementation == "sdpa"  # the packed attention was switched back


@pytest.mark.builtin
def test_builtin_model_accuracy_is_the_reference_accuracy():
    """On a slice of the support test set, zero-shot and 3-shot, in fp32."""
    from tuneforge.config import TaskConfig
    from tuneforge.data.templates import prompt_and_reference
    from tuneforge.eval.fewshot import pick_shots, with_shots
    from tuneforge.eval.tasks import gold_label, load_task_examples, resolve_task

    torch.manual_seed(0)
    model, tok = load_model("builtin:smollm2-135m-instruct")
    data = "examples/data/support"
    test = load_task_examples(f"{data}/test.jsonl", None)[:24]
    train = load_task_examples(f"{data}/train.jsonl", None)
    spec = resolve_task(TaskConfig(name="support", type="classification",
                                   labels=f"{data}/labels.json"), test, train, tok)
    gold = [gold_label(ex, spec) for ex in test]
    for k in (0, 3):
        shots = pick_shots(train, k, label_of=lambda ex: gold_label(ex, spec))
        prompts = [with_shots(prompt_and_reference(ex)[0], shots) for ex in test]
        args = (model, tok, prompts, gold, spec.labels)
        fast = classify(*args, prefix=spec.prefix, suffix=spec.suffix, bf16=False)
        plain = classify(*args, prefix=spec.prefix, suffix=spec.suffix, bf16=False, packed=False)
        assert round(fast.accuracy, 3) == round(plain.accuracy, 3)
        assert fast.predicted == plain.predicted


def training_loss(model, sequences) -> tuple[float, int]:
    """Training's loss, one whole sequence per packed row, fp32: the reference."""
    from tuneforge.data.packing import pack
    from tuneforge.losses.causal_lm import CausalLMLoss

    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            packed = pack([seq])
            nll, n = CausalLMLoss(model)(packed["input_ids"], packed["targets"],
                                         position_ids=packed["position_ids"],
                                         seq_lens=packed["seq_lens"])
            total, count = total + float(nll), count + int(n)
    return total, count


def test_target_nll_equals_the_training_loss_with_and_without_a_shared_prefix(tiny):
    from tuneforge.data.render import IGNORE_INDEX, TokenizedExample
    from tuneforge.eval.classify import target_nll

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def seq(prefix, own, trained_from, gaps=()):
        ids = prefix + torch.randint(0, vocab, (own,), generator=g).tolist()
        labels = [IGNORE_INDEX if t < trained_from or t in gaps else x for t, x in enumerate(ids)]
        return TokenizedExample(ids, labels)

    shots = torch.randint(0, vocab, (40,), generator=g).tolist()
    # a shared untrained start (few-shot context), answers of several lengths, one with an
    # untrained gap inside (a multi-turn chat), one trained from its second token on
    sequences = [seq(shots, 5 + 7 * i, 40 + 3 + i, gaps={50}) for i in range(6)]
    for group_tokens in (1, 64, 100_000):
        got = target_nll(model, sequences, bf16=False, group_tokens=group_tokens)
        want = training_loss(model, sequences)
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
    # a target inside the common start shortens the shared prefix to before it
    early = [*sequences, seq(shots, 9, 30)]
    got, want = target_nll(model, early, bf16=False), training_loss(model, early)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
    # nothing in common, nothing trained
    plain = [seq([], 12, 1), seq([], 30, 4)]
    got, want = target_nll(model, plain, bf16=False), training_loss(model, plain)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
    assert target_nll(model, [seq([], 5, 99)], bf16=False) == (0.0, 0)


def test_completion_loss_with_shots_equals_the_training_loss(tiny):
    from tuneforge.data.example import Example, Message
    from tuneforge.data.render import render_sft
    from tuneforge.eval.evaluate import completion_loss
    from tuneforge.eval.fewshot import shots_as_context

    model, tok = tiny
    train = [Example("t.jsonl", i + 1, "chat", messages=[Message("user", f"refund {i} please"),
                                                           Message("assistant", "Returns")])
             for i in range(3)]
    test = [Example("x.jsonl", i + 1, "chat", messages=[
        Message("system", "Route the ticket."), Message("user", "card charged twice " * (i + 1)),
        Message("assistant", ["Billing", "Sales", "Returns please"][i % 3])]) for i in range(5)]
    for shots in ((), train):
        context = [shots_as_context(ex, shots) for ex in test]
        total, count = training_loss(model, [render_sft(ex, tok) for ex in context])
        assert completion_loss(model, tok, context, bf16=False) == pytest.approx(total / count,
                                                                                 rel=1e-5)


def test_target_nll_falls_back_to_whole_sequences_when_a_sliding_window_is_reached():
    from tuneforge.data.render import IGNORE_INDEX, TokenizedExample
    from tuneforge.eval.classify import target_nll

    model, _ = load_model("tiny:mistral")
    model.eval()
    model.config.sliding_window = 6  # shorter than the sequences: the packed path would differ
    g = torch.Generator().manual_seed(1)
    shots = torch.randint(0, model.config.vocab_size, (20,), generator=g).tolist()
    sequences = []
    for n in (5, 9):
        ids = shots + torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        sequences.append(TokenizedExample(ids, [IGNORE_INDEX] * 20 + ids[20:]))
    got, want = target_nll(model, sequences, bf16=False), training_loss(model, sequences)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
