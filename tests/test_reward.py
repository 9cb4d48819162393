"""The reward recipe on a tiny llama: the head, the losses on data, saving, `tuneforge score`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import preference_records, write_jsonl
from test_cli_train import tuneforge

from tuneforge.config import AdapterConfig, TrainConfig, load_config
from tuneforge.data.formats import load_examples
from tuneforge.data.packing import pack, pad
from tuneforge.errors import DataError, ModelLoadError
from tuneforge.models.adapters import prepare_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.models.heads import RewardModel, RewardScorer, load_reward_model, save_head
from tuneforge.models.loading import load_model
from tuneforge.recipes.reward_model import (
    LOSS_KINDS,
    RewardObjective,
    check_kinds,
    held_out_metrics,
    render_rewarded,
)
from tuneforge.train.loop import train
from tuneforge.train.run_folder import save_result

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "amber", "violet", "teal", "black", "white"]


def ranked_answers(i: int) -> tuple[str, list[str]]:
    """A question and three answers, best first: the colour, a hedge, a refusal."""
    colour = COLOURS[(i * 7) % len(COLOURS)]
    return f"item {i}: what colour is it?", [f"It is {colour}.", f"Maybe {colour}, maybe not.",
                                             "I cannot say."]


def ranking_records(lo: int, hi: int) -> list[dict]:
    return [{"prompt": q, "responses": answers} for q, answers in map(ranked_answers, range(lo, hi))]


def rating_records(lo: int, hi: int) -> list[dict]:
    out = []
    for i in range(lo, hi):
        question, answers = ranked_answers(i)
        out += [{"prompt": question, "response": a, "rating": 3 - k} for k, a in enumerate(answers)]
    return out


def data_for(loss: str, lo: int, hi: int) -> list[dict]:
    if loss == "bradley_terry":
        return preference_records(hi)[lo:]
    return rating_records(lo, hi) if loss == "regression" else ranking_records(lo, hi)


def items_for(tmp_path: Path, loss: str, lo: int, hi: int, tok) -> list:
    path = write_jsonl(tmp_path / f"{loss}-{lo}.jsonl", data_for(loss, lo, hi))
    examples = load_examples(path)
    check_kinds(examples, loss)
    return [render_rewarded(e, tok) for e in examples]


def lora_reward_model(seed: int = 0) -> tuple[RewardModel, object]:
    model, tok = load_model("tiny:llama")
    model = prepare_model(model, AdapterConfig(method="lora", r=4, alpha=8), seed=seed)
    return RewardModel(model), tok


def scores_of(objective: RewardObjective, items: list) -> dict[str, float]:
    with torch.no_grad():
        for lo in range(0, len(items), 8):
            objective.loss(objective.module, items[lo : lo + 8], torch.device("cpu"))
    return held_out_metrics(items)


def test_packed_rewards_equal_padded_per_sequence_rewards(tmp_path):
    reward_model, tok = lora_reward_model()
    with torch.no_grad():  # an adapter and head away from their initial values
        for name, p in reward_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    items = items_for(tmp_path, "plackett_luce", 0, 3, tok)
    seqs = [s for it in items for s in it.sequences]
    use_packed_attention(reward_model)
    with torch.no_grad():
        packed = reward_model.score_packed(seqs, torch.device("cpu"))
        right = pad(seqs, tok.pad_token_id)
        padded = reward_model(right["input_ids"], attention_mask=right["attention_mask"])
        one_by_one = torch.cat([reward_model(pack([s])["input_ids"]) for s in seqs])
    assert packed.shape == (9,)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, one_by_one, rtol=1e-5, atol=1e-5)
    assert packed.std() > 1e-3  # different sequences, different rewards


@pytest.mark.parametrize("loss", list(LOSS_KINDS))
def test_training_raises_held_out_pairwise_accuracy(tmp_path, loss):
    reward_model, tok = lora_reward_model()
    train_set = items_for(tmp_path, loss, 0, 24, tok)
    val_set = items_for(tmp_path, loss, 24, 32, tok)
    objective = RewardObjective(reward_model, loss)
    before = scores_of(objective, val_set)
    cfg = TrainConfig(batch_size=8, max_steps=15, lr=1e-2, bf16="false", progress=False,
                      eval_every=0, save_every=0, warmup_steps=0, schedule="constant")
    result = train(reward_model, train_set, [], cfg, tmp_path / "run", objective=objective)
    after = scores_of(objective, val_set)
    assert after["pairwise_accuracy"] >= 0.9 > before["pairwise_accuracy"] + 0.2, (before, after)
    steps = [r for r in result.history if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    if loss == "regression":
        assert after["pearson"] > 0.9 and after["mse"] < before["mse"]
    else:
        assert after["kendall_tau"] > 0.7 and after["spearman"] > 0.7


def test_margin_from_the_record_enters_the_bradley_terry_loss(tmp_path):
    reward_model, tok = lora_reward_model()
    records = preference_records(4)
    records[0]["margin"] = 2.5
    examples = load_examples(write_jsonl(tmp_path / "m.jsonl", records))
    items = [render_rewarded(e, tok) for e in examples]
    assert [it.margin for it in items] == [2.5, None, None, None]
    objective = RewardObjective(reward_model, "bradley_terry")
    with torch.no_grad():
        loss, _ = objective.loss(objective.module, items, torch.device("cpu"))
        gaps = torch.tensor([it.last_scores[0] - it.last_scores[1] for it in items])
    want = -torch.nn.functional.logsigmoid(gaps - torch.tensor([2.5, 0, 0, 0])).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert render_rewarded(examples[0], tok, use_margin=False).margin is None
    records[1]["margin"] = "big"
    bad = load_examples(write_jsonl(tmp_path / "bad.jsonl", records))
    with pytest.raises(DataError, match=r"bad.jsonl:2: margin: expected a finite number"):
        render_rewarded(bad[1], tok)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_save_and_load_give_the_same_rewards(tmp_path, method):
    model, tok = load_model("tiny:llama")
    reward_model = RewardModel(prepare_model(model, AdapterConfig(method=method, r=4, alpha=8)))
    with torch.no_grad():
        for _name, p in reward_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # trained-looking weights
    config = load_config(None, ["data.train=x", "recipe=reward", "model.name=tiny:llama",
                                f"adapter.method={method}"])
    out = save_result(reward_model.model, tok, config, tmp_path / "run",
                      lambda folder: save_head(reward_model, folder))
    assert json.loads((out / "tuneforge.json").read_text())["reward_head"] == "reward_head.safetensors"
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
               "item 3: what colour is it?"]
    responses = ["Hello.", [{"role": "assistant", "content": "It is red."}]]
    use_packed_attention(reward_model)
    loaded = load_reward_model(tmp_path / "run", batch_size=1)
    got = loaded.score(prompts, responses)
    reward_model.eval()
    want = RewardScorer(reward_model, tok).score(prompts, responses)
    assert got == pytest.approx(want, abs=1e-5) and got[0] != pytest.approx(got[1])


def write_reward_config(tmp_path: Path, loss: str = "plackett_luce", **train_settings) -> str:
    write_jsonl(tmp_path / "train.jsonl", data_for(loss, 0, 24))
    write_jsonl(tmp_path / "val.jsonl", data_for(loss, 24, 32))
    settings = {"batch_size": 8, "max_steps": 12, "lr": 1e-2, "bf16": "false", "eval_every": 6,
                "save_every": 6, "warmup_steps": 0, "metric_for_best": "val_pairwise_accuracy",
                **train_settings}
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(
        "recipe: reward\n"
        "model: {name: 'tiny:llama'}\n"
        "adapter: {method: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, validation: {tmp_path / 'val.jsonl'}}}\n"
        f"train: {json.dumps(settings)}\n"
        f"reward: {{loss: {loss}}}\n")
    return str(cfg)


def test_train_then_score_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = tuneforge("train", write_reward_config(tmp_path), "--set", f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["recipe"] == "reward" and summary["reward_loss"] == "plackett_luce"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_pairwise_accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"val_kendall_tau", "val_spearman", "val_loss"} <= evals[0].keys()
    assert summary["best_metric"] == summary["best_val_pairwise_accuracy"] == 1.0
    assert (run / "adapter" / "reward_head.safetensors").is_file()

    out = tmp_path / "scores.jsonl"
    proc = tuneforge("score", str(run), "--data", str(tmp_path / "val.jsonl"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    # 8 rankings of 3: 24 ordered pairs, and the same figure as the validation pass
    assert scored["pairs"] == 24 and scored["pairwise_accuracy"] == 1.0
    assert "pairwise accuracy 1.0000 over 24 ordered pairs" in proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 8 and lines[0]["source"].endswith("val.jsonl:1")
    assert all(r["rewards"][0] > r["rewards"][1] > r["rewards"][2] for r in lines)
    # rating-style files are scored too (one reward each), straight to stdout
    write_jsonl(tmp_path / "ratings.jsonl", rating_records(24, 28))
    proc = tuneforge("score", str(run), "--data", str(tmp_path / "ratings.jsonl"))
    assert proc.returncode == 0, proc.stderr
    rated = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["rating"] for r in rated[:3]] == [3, 2, 1] and len(rated[0]["rewards"]) == 1
    assert "pearson" in proc.stderr


def test_wrong_data_for_the_loss_and_score_errors_exit_2(tmp_path):
    cfg = write_reward_config(tmp_path)
    proc = tuneforge("train", cfg, "--set", "reward.loss=regression",
                     "--set", f"output_dir={tmp_path / 'r1'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.jsonl:1: ranking data cannot train reward.loss=regression" in proc.stderr
    assert "use reward.loss=plackett_luce" in proc.stderr
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    proc = tuneforge("train", cfg, "--set", f"data.train={tmp_path / 'sft.jsonl'}",
                     "--set", "data.validation=null", "--set", f"output_dir={tmp_path / 'r2'}")
    assert proc.returncode == 2 and "sft.jsonl:1" in proc.stderr
    assert "cannot train the reward recipe" in proc.stderr and "Traceback" not in proc.stderr
    # score: a folder that is no reward run, and a file with nothing to score
    proc = tuneforge("score", str(tmp_path), "--data", str(tmp_path / "val.jsonl"))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr
    proc = tuneforge("score", str(tmp_path), "--data", str(tmp_path / "sft.jsonl"))
    assert proc.returncode == 2 and "sft.jsonl:1: prompt_completion records have no response" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_reward_model_refuses_a_policy_run(tmp_path):
    model, tok = load_model("tiny:llama")
    config = load_config(None, ["data.train=x", "recipe=dpo", "model.name=tiny:llama"])
    save_result(prepare_model(model, config.adapter), tok, config, tmp_path / "run")
    with pytest.raises(ModelLoadError, match="not a reward model .*dpo recipe"):
        load_reward_model(tmp_path / "run")


@pytest.mark.parametrize("name", ["reward-ranking.yaml", "reward-pairs.yaml"])
def test_shipped_reward_configs_fit_their_data(name):
    config = load_config(REPO / "configs" / name)
    assert config.recipe == "reward" and config.train.metric_for_best == "val_pairwise_accuracy"
    for path in filter(None, (config.data.train, config.data.validation)):
        check_kinds(load_examples(REPO / path), config.reward.loss)
