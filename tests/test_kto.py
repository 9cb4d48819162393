"""The KTO recipe on a tiny llama: the loss against a hand-written reference, training, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import chat_records, write_jsonl, write_recipe_config
from test_cli_train import tuneforge
from test_dpo import lora_off_zero, naive_sequence_logps, train_six_steps, train_twelve_steps

from tuneforge.config import AdapterConfig, load_config
from tuneforge.data.formats import parse_examples
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import prepare_model
from tuneforge.models.loading import load_model
from tuneforge.recipes.kto import KTOObjective, with_mismatched
from tuneforge.train.scoring import render_responses


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def unpaired_records(n: int, seed: int = 0) -> list[dict]:
    """Thumbs up for the colour answer, thumbs down for a refusal, alternating."""
    out = []
    for i, r in enumerate(chat_records(n, seed)):
        user, answer = r["messages"]
        good = i % 2 == 0
        completion = answer if good else {"role": "assistant", "content": "I cannot say."}
        out.append({"prompt": [user], "completion": [completion], "label": good})
    return out


def items(tmp_path, n=8):
    _, tok = load_model("tiny:llama")
    path = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_records(n))
    examples, problems = parse_examples(path)
    assert not problems and all(e.kind == "unpaired" for e in examples)
    return [render_responses(e, tok) for e in with_mismatched(examples)]


def test_each_completion_gets_the_next_records_completion_as_its_mismatched_twin(tmp_path):
    data = items(tmp_path, 4)
    for i, item in enumerate(data):
        twin = data[(i + 1) % 4].sequences[0]
        assert item.sequences[1].labels[-len(twin.labels):] == twin.labels
        assert item.targets == [1.0 if i % 2 == 0 else 0.0]


def test_kto_loss_matches_a_hand_written_reference(tmp_path):
    model = lora_off_zero()
    data = items(tmp_path, 6)
    beta, w_up, w_down = 0.3, 1.0, 1.5
    objective = KTOObjective(model, beta, w_up, w_down, reference="cached")
    loss, metrics = objective.loss(objective.module, data, torch.device("cpu"))

    seqs = [s for it in data for s in it.sequences]
    policy, _ = naive_sequence_logps(model, seqs, 0)
    with model.disable_adapter():
        ref, _ = naive_sequence_logps(model, seqs, 0)
    # KTO by hand: z0 = max(0, mean log-ratio of the mismatched completions), no gradient;
    # desirable: w_up * (1 - sigmoid(beta * (ratio - z0))), undesirable: w_down * (1 - sigmoid(beta * (z0 - ratio)))
    policy, ref = policy.detach().tolist(), ref.tolist()
    z0 = max(0.0, sum(p - r for p, r in zip(policy[1::2], ref[1::2])) / len(data))
    want = 0.0
    for i in range(len(data)):
        ratio = policy[2 * i] - ref[2 * i]
        if i % 2 == 0:
            want += w_up * (1 - sigmoid(beta * (ratio - z0)))
        else:
            want += w_down * (1 - sigmoid(beta * (z0 - ratio)))
    # fp32 sums of ~100 token log-probs, packed vs padded: equal to ~1e-5 relative
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert metrics["kl"].item() == pytest.approx(z0 * len(data), rel=1e-4, abs=1e-4)
    loss.backward()  # the loss trains the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("method,reference", [("lora", "cached"), ("full", "precompute")])
def test_kto_pushes_thumbs_up_above_and_thumbs_down_below(tmp_path, method, reference):
    model, _ = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method=method, r=4, alpha=8))
    data = items(tmp_path, 16)
    objective = KTOObjective(model, beta=0.5, reference=reference)
    steps = train_twelve_steps(model, objective, data, tmp_path)
    # policy == reference at the start: every reward and z0 are 0, each example costs 1/2
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert steps[0]["signed_reward"] == pytest.approx(0.0, abs=1e-4)
    assert steps[-1]["signed_reward"] > 1.0 and steps[-1]["reward_accuracy"] == 1.0
    assert steps[-1]["loss"] < 0.35


def write_kto_config(tmp_path, **kto) -> str:
    return write_recipe_config(tmp_path, "kto", unpaired_records(24), unpaired_records(32)[24:],
                               {"beta": 0.5, **kto})


def test_kto_cli_end_to_end_and_bad_settings(tmp_path):
    cfg = write_kto_config(tmp_path)
    summary = train_six_steps(cfg, tmp_path / "run")
    assert summary["recipe"] == "kto" and summary["reference"] == "cached"

    # preference pairs are not unpaired data: refused by file:line, no traceback
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    proc = tuneforge("train", cfg, "--set", f"data.train={tmp_path / 'pairs.jsonl'}",
                     "--set", "data.validation=null", "--set", f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "cannot train the kto recipe" in proc.stderr
    assert "pairs.jsonl:1" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["kto.beta=0", "kto.reference=online", "adapter.method=full",
                          "kto.desirable_weight=-1"])
    text = str(err.value)
    assert "kto.beta: must be > 0" in text and "kto.reference=online needs an adapter" in text
    assert "kto.desirable_weight" in text
