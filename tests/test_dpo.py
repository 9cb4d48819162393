"""The DPO recipe on a tiny llama: sequence log-probs, the reference, training, the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import preference_records, write_jsonl, write_recipe_config
from test_cli_train import tuneforge

from tuneforge.config import AdapterConfig, TrainConfig, load_config
from tuneforge.data.formats import parse_examples
from tuneforge.data.packing import pack, pad
from tuneforge.data.render import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import prepare_model
from tuneforge.models.loading import load_model
from tuneforge.recipes.dpo import PreferenceObjective
from tuneforge.train.loop import train
from tuneforge.train.scoring import SequenceLogProbs, render_responses


def pairs(tmp_path, n=8, seed=0):
    _, tok = load_model("tiny:llama")
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_records(n, seed))
    examples, problems = parse_examples(path)
    assert not problems
    return [render_responses(e, tok) for e in examples]


def naive_sequence_logps(model, seqs, pad_id):
    """Full-vocabulary log-softmax on a padded batch: the obvious, memory-hungry way."""
    batch = pad(seqs, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(1), keep.sum(1)


def test_packed_sequence_logps_equal_the_naive_padded_ones(tmp_path):
    model, tok = load_model("tiny:llama")
    seqs = [s for p in pairs(tmp_path, 3) for s in (p.chosen, p.rejected)]
    packed = pack(seqs)
    from tuneforge.models.attention import use_packed_attention

    use_packed_attention(model)
    got, counts = SequenceLogProbs(model, chunk_size=5)(
        packed["input_ids"], packed["targets"], position_ids=packed["position_ids"],
        seq_lens=packed["seq_lens"])
    want, want_counts = naive_sequence_logps(model, seqs, tok.pad_token_id)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == want_counts.tolist() == [s.num_targets for s in seqs]


def test_only_the_response_is_scored(tmp_path):
    p = pairs(tmp_path, 1)[0]
    _, tok = load_model("tiny:llama")
    chosen = tok.decode([t for t in p.chosen.labels if t != IGNORE_INDEX])
    rejected = tok.decode([t for t in p.rejected.labels if t != IGNORE_INDEX])
    assert chosen.startswith("It is ") and "what colour" not in chosen
    assert rejected.startswith("I cannot say.")


def test_adapters_off_reference_equals_a_frozen_copy(tmp_path):
    model, _ = load_model("tiny:llama")
    frozen = copy.deepcopy(model).eval()
    model = prepare_model(model, AdapterConfig(method="lora", r=4, alpha=8))
    data = pairs(tmp_path, 8)
    objective = PreferenceObjective(model, "dpo", beta=0.5, reference="online")
    train(model, data, [], TrainConfig(batch_size=4, max_steps=3, lr=1e-2, bf16="false",
                                       progress=False, eval_every=0, save_every=0),
          tmp_path / "run", objective=objective)
    objective.reference.compute(data, torch.device("cpu"))
    copy_scores = SequenceLogProbs(frozen)
    packed = pack([s for p in data for s in (p.chosen, p.rejected)])
    with torch.no_grad():
        want, _ = copy_scores(packed["input_ids"], packed["targets"],
                              position_ids=packed["position_ids"], seq_lens=packed["seq_lens"])
    got = torch.tensor([v for p in data for v in p.ref])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and the trained policy has moved away from it
    policy, _ = objective.module(packed["input_ids"], packed["targets"],
                                 position_ids=packed["position_ids"], seq_lens=packed["seq_lens"])
    assert not torch.allclose(policy.detach(), want, atol=1e-3)


def train_twelve_steps(model, objective, data, tmp_path) -> list[dict]:
    """12 constant-rate steps of 8 on ``data`` (the reference precomputed first when the
    objective's mode asks for it); the logged steps."""
    if objective.reference.mode == "precompute":
        objective.reference.compute(data, torch.device("cpu"))
    cfg = TrainConfig(batch_size=8, max_steps=12, lr=5e-3, bf16="false", progress=False,
                      eval_every=0, save_every=0, warmup_steps=0, schedule="constant")
    result = train(model, data, [], cfg, tmp_path / "run", objective=objective)
    return [r for r in result.history if "loss" in r]


@pytest.mark.parametrize("method,reference", [("lora", "cached"), ("full", "precompute")])
def test_dpo_grows_the_chosen_rejected_margin(tmp_path, method, reference):
    model, _ = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method=method, r=4, alpha=8))
    data = pairs(tmp_path, 16)
    objective = PreferenceObjective(model, "dpo", beta=0.5, reference=reference)
    steps = train_twelve_steps(model, objective, data, tmp_path)
    # policy == reference at the start: every implicit reward is 0 and the loss is log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert steps[-1]["reward_margin"] > 1.0 and steps[-1]["reward_accuracy"] == 1.0
    assert steps[-1]["loss"] < 0.5 * math.log(2)


def lora_off_zero():
    """A tiny llama with a LoRA adapter moved off zero, so the policy differs from the reference."""
    model, _ = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method="lora", r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_dpo_loss_matches_a_hand_written_reference(tmp_path):
    model = lora_off_zero()
    data = pairs(tmp_path, 4)
    objective = PreferenceObjective(model, "dpo", beta=0.3, reference="cached")
    loss, metrics = objective.loss(objective.module, data, torch.device("cpu"))
    seqs = [s for p in data for s in (p.chosen, p.rejected)]
    policy, _ = naive_sequence_logps(model, seqs, 0)
    with model.disable_adapter():
        ref, _ = naive_sequence_logps(model, seqs, 0)
    logits = 0.3 * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
    torch.testing.assert_close(loss, -F.logsigmoid(logits).sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics["reward_margin"], logits.sum(), rtol=1e-4, atol=1e-4)


def write_dpo_config(tmp_path, **pref) -> str:
    return write_recipe_config(tmp_path, "dpo", preference_records(24), preference_records(32)[24:],
                               {"beta": 0.5, **pref})


def train_six_steps(cfg: str, run) -> dict:
    """``tuneforge train`` of a :func:`write_recipe_config` config: validated at steps 3 and 6,
    the best by val_reward_accuracy, the adapter saved; its summary."""
    proc = tuneforge("train", cfg, "--set", f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert summary["best_metric"] == max(r["val_reward_accuracy"] for r in evals)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    return summary


def test_dpo_cli_end_to_end(tmp_path):
    run = tmp_path / "run"
    summary = train_six_steps(write_dpo_config(tmp_path), run)
    assert summary["recipe"] == "dpo" and summary["preference_loss"] == "dpo"
    assert json.loads((run / "adapter" / "tuneforge.json").read_text())["recipe"] == "dpo"


def test_dpo_refuses_sft_data_and_bad_settings(tmp_path):
    cfg = write_dpo_config(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    proc = tuneforge("train", cfg, "--set", f"data.train={tmp_path / 'sft.jsonl'}",
                     "--set", "data.validation=null", "--set", f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "cannot train the dpo recipe" in proc.stderr
    assert "sft.jsonl:1" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["preference.loss=dpx", "adapter.method=full"])
    assert "unknown loss 'dpx'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["preference.options={label_smoothin: 0.1}",
                          "preference.reference=cached", "adapter.method=full"])
    assert "label_smoothin" in str(err.value) and "label_smoothing" in str(err.value)
    assert "reference=cached needs an adapter" in str(err.value)


def test_losses_against_a_reference_are_not_compiled_under_auto():
    """DPO's loss subtracts a reference pass from the policy's: compiled with and without the
    adapters those round differently, so ``train.compile: auto`` leaves them eager; losses
    without a reference (SimPO, ORPO) may compile."""
    model, _ = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method="lora", dropout=0.0))
    assert PreferenceObjective(model, "dpo").compile_auto is False
    assert PreferenceObjective(model, "simpo").compile_auto is True
