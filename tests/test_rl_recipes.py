"""The online and ranking recipes on a tiny llama: PPO and GRPO raise a reward, LiPO widens the
best-vs-worst margin, the adapters-off reference is the starting model, run folders and CLI errors.

The reward here is the share of lowercase ASCII letters in a completion: a random tiny model
writes about 10% of them (26 of its 259 byte tokens), so the reward has room to rise and a
dense signal on every token.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import chat_records, write_jsonl
from safetensors.torch import load_file
from test_cli_train import tuneforge

from tuneforge.config import AdapterConfig, load_config
from tuneforge.generation import generate_batch
from tuneforge.models.adapters import prepare_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.models.loading import load_model
from tuneforge.recipes import run_recipe
from tuneforge.train.rollouts import Completion, PromptItem
from tuneforge.train.scoring import Reference, TokenLogProbs, score_tokens

REWARD_CODE = '''
def letters(prompts, completions, **columns):
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in c) / max(1, len(c))
            for c in completions]
'''


def prompt_files(tmp: Path) -> dict[str, str]:
    (tmp / "reward.py").write_text(REWARD_CODE)
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": r["messages"][:1]} for r in chat_records(16)])
    write_jsonl(tmp / "val.jsonl", [{"prompt": r["messages"][:1]} for r in chat_records(20)[16:]])
    return {"train": str(tmp / "prompts.jsonl"), "val": str(tmp / "val.jsonl"),
            "reward": f"{tmp / 'reward.py'}:letters"}


def cli_train(tmp: Path, *settings: str):
    """``tuneforge train`` with a config of ``--set`` overrides only."""
    (tmp / "base.yaml").write_text("model: {name: 'tiny:llama'}\n")
    return tuneforge("train", str(tmp / "base.yaml"), *(x for s in settings for x in ("--set", s)))


def rl_config(tmp: Path, recipe: str, *overrides: str):
    files = prompt_files(tmp)
    return load_config(None, [
        f"recipe={recipe}", f"output_dir={tmp / recipe}", "model.name=tiny:llama",
        f"data.train={files['train']}", f"rl.reward={files['reward']}", "rl.max_new_tokens=12",
        "train.bf16=false", "train.progress=false", "train.warmup_steps=0",
        "train.schedule=constant", "train.save_every=0", "train.eval_every=0", *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def early_late(records: list[dict], key: str, k: int = 5) -> tuple[float, float]:
    values = [r[key] for r in records if key in r]
    return sum(values[:k]) / k, sum(values[-k:]) / k


# ------------------------------------------------------------------------------ PPO, GRPO


def test_ppo_raises_the_reward_with_a_bounded_kl(tmp_path):
    config = rl_config(tmp_path, "ppo", "adapter.method=full", "train.lr=2e-3",
                       "train.batch_size=16", "train.max_steps=20", "rl.kl_coef=0.01")
    summary = run_recipe(config)
    records = [r for r in metrics(tmp_path / "ppo") if "reward" in r]
    assert [r["step"] for r in records] == list(range(1, 21))
    early, late = early_late(records, "reward")
    assert late > early + 0.1, (early, late)
    assert summary["reward_first"] == pytest.approx(early)
    assert summary["reward_last"] == pytest.approx(late)
    # the policy starts as the reference: no KL on the first rollout; it grows, but stays sane
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(abs(r["kl"]) < 20 for r in records)
    assert records[-1]["kl"] > 0
    for key in ("entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss", "grad_norm"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    # 4 epochs x 2 minibatches: eight optimizer steps per rollout
    assert records[-1]["optimizer_steps"] == 20 * 8
    assert records[-1]["entropy"] < records[0]["entropy"]


@pytest.mark.parametrize("compile_layers", ["false", "true"])
def test_first_ppo_update_sees_the_rollouts_own_log_probs(tmp_path, compile_layers):
    """With one epoch of one minibatch, the update scores exactly what the rollout did: ratio
    1, nothing clipped. Log-probs taken under other settings (dropout, another packing, the
    reference) would show here, and so would a compiled update pass (train.compile) that
    scored differently from the eager rollout."""
    config = rl_config(tmp_path, "ppo", "train.batch_size=6", "train.max_steps=2", "train.lr=1e-2",
                       "rl.ppo_epochs=1", "rl.minibatches=1", f"train.compile={compile_layers}")
    run_recipe(config)
    for r in metrics(tmp_path / "ppo"):
        assert r["ratio"] == pytest.approx(1.0, abs=1e-5)
        assert r["approx_kl"] == pytest.approx(0.0, abs=1e-6) and r["clipfrac"] == 0.0


def test_resumed_ppo_run_continues_the_same_trajectory(tmp_path):
    """A checkpoint holds the adapter, the value head, AdamW and the RNG (which seeds sampling):
    4 rollouts straight equal 2, then 2 more resumed from the step-2 checkpoint."""
    settings = ["train.batch_size=4", "train.lr=1e-2", "train.save_every=2", "rl.max_new_tokens=6"]
    straight = rl_config(tmp_path, "ppo", "train.max_steps=4", *settings)
    run_recipe(straight)
    resumed = rl_config(tmp_path, "ppo", "train.max_steps=2", f"output_dir={tmp_path / 'resumed'}",
                        *settings)
    run_recipe(resumed)
    resumed.train.max_steps = 4
    run_recipe(resumed, resume=True)
    keys = ("reward", "kl", "loss", "value_loss", "completion_length")
    want = [r[k] for r in metrics(tmp_path / "ppo") for k in keys]
    got = [r[k] for r in metrics(tmp_path / "resumed") for k in keys]
    assert len(got) == 4 * len(keys) and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want[2 * len(keys) :] != want[: 2 * len(keys)]


def test_grpo_raises_the_reward_and_writes_its_run_folder(tmp_path):
    config = rl_config(tmp_path, "grpo", "adapter.method=full", "train.lr=3e-3",
                       "train.batch_size=4", "train.max_steps=20", "rl.num_generations=4")
    summary = run_recipe(config)
    run = tmp_path / "grpo"
    records = [r for r in metrics(run) if "reward" in r]
    early, late = early_late(records, "reward")
    assert late > early + 0.05, (early, late)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5) and records[-1]["kl"] < 5
    assert summary["num_generations"] == 4 and summary["steps"] == 20
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png", "loss.png",
                 "model/model.safetensors"):
        assert (run / name).is_file(), name


# ------------------------------------------------------------------------------ reference


def test_adapters_off_reference_gives_the_starting_models_log_probs():
    base, tok = load_model("tiny:llama")
    start = copy.deepcopy(base)
    model = prepare_model(base, AdapterConfig(method="lora", r=4, alpha=8), seed=0)
    use_packed_attention(model)
    use_packed_attention(start)
    with torch.no_grad():  # a trained-looking adapter: LoRA's B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompt = PromptItem([{"role": "user", "content": "hi"}], tok.encode("<|im_start|>user\nhi"),
                        "hi", {}, "x:1")
    completions = [Completion(prompt, tok.encode(text), text, False)
                   for text in ("red and blue", "a", "It is green.")]
    cpu = torch.device("cpu")
    policy = TokenLogProbs(model).train()
    via_adapters_off = Reference.for_rollouts(policy).token_logps(completions, cpu)
    frozen_copy = score_tokens(TokenLogProbs(start).eval(), completions, cpu)
    mask = frozen_copy["mask"].bool()
    torch.testing.assert_close(via_adapters_off[mask], frozen_copy["logps"][mask], rtol=0, atol=1e-5)
    # the adapter does change the policy, and it is switched back on (and to training) after
    with torch.no_grad():
        now = score_tokens(policy, completions, cpu)["logps"]
    assert (now[mask] - via_adapters_off[mask]).abs().max() > 1e-2
    assert policy.training


@pytest.mark.parametrize("autocast", [False, True])
def test_rollouts_sample_from_the_adapted_policy(autocast):
    """Generation's inference copy of a LoRA model must carry the adapter (it once dropped it,
    so GRPO sampled from the base model at every step while training the adapter)."""
    base, tok = load_model("tiny:llama")
    model = prepare_model(copy.deepcopy(base), AdapterConfig(method="lora", r=4, alpha=8), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    merged = copy.deepcopy(model).merge_and_unload()
    conversation = [[{"role": "user", "content": "item 3: what colour is it?"}]]

    def greedy(m) -> list[int]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return generate_batch(m, tok, conversation, max_new_tokens=16)[0].token_ids

    assert greedy(model) == greedy(merged) != greedy(base)


# ------------------------------------------------------------------------------ rank


def ranking_records(n: int) -> list[dict]:
    out = []
    for r in chat_records(n):
        user, answer = r["messages"]
        out.append({"prompt": [user], "responses": [
            answer["content"], "Maybe it is some colour.", "I cannot say, sorry."]})
    return out


@pytest.mark.parametrize("loss", ["lipo", "rrhf"])
def test_rank_widens_the_best_vs_worst_margin(tmp_path, loss):
    write_jsonl(tmp_path / "rank.jsonl", ranking_records(16))
    config = load_config(None, [
        "recipe=rank", f"output_dir={tmp_path / 'rank'}", "model.name=tiny:llama",
        f"data.train={tmp_path / 'rank.jsonl'}", f"rank.loss={loss}", "rank.beta=0.5",
        "train.batch_size=4", "train.max_steps=16", "train.lr=5e-3", "train.bf16=false",
        "train.progress=false", "train.warmup_steps=0", "train.save_every=0"])
    summary = run_recipe(config)
    records = metrics(tmp_path / "rank")
    early, late = early_late(records, "logp_margin", 4)
    assert late > early + 0.3, (early, late)
    if loss == "lipo":  # the implicit reward starts at 0 (policy == reference) and grows
        assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
        assert early_late(records, "reward_margin", 4)[1] > 0.5
    assert early_late(records, "pairwise_accuracy", 4)[1] == 1.0
    assert summary["rank_loss"] == loss and (tmp_path / "rank/adapter/adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------ CLI


def test_ppo_cli_run_folder_holds_adapter_value_head_and_curves(tmp_path):
    files = prompt_files(tmp_path)
    run = tmp_path / "run"
    proc = cli_train(
        tmp_path, "recipe=ppo", f"output_dir={run}", f"data.train={files['train']}",
        f"data.validation={files['val']}", f"rl.reward={files['reward']}", "rl.max_new_tokens=8",
        "train.batch_size=4", "train.max_steps=3", "train.eval_every=2", "train.save_every=2",
        "train.bf16=false", "adapter.r=4")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["recipe"] == "ppo" and summary["steps"] == 3
    assert summary["val_reward_last"] is not None
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png", "loss.png",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/value_head.safetensors", "checkpoints/step-000003/trainable.safetensors"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "adapter/tuneforge.json").read_text())
    assert meta["recipe"] == "ppo" and meta["value_head"] == "value_head.safetensors"
    head = load_file(run / "adapter/value_head.safetensors")
    assert head["weight"].shape == (1, 64) and head["bias"].shape == (1,)
    # the value head is trained: it left its zero bias, and the checkpoint holds it too
    assert head["bias"].abs().item() > 0
    assert any("value_head" in k for k in load_file(run / "checkpoints/step-000003/trainable.safetensors"))
    records = metrics(run)
    assert [r["step"] for r in records if "val_reward" in r] == [2, 3]
    assert {"reward", "kl", "entropy", "clipfrac", "value_loss", "approx_kl"} <= set(records[0])


@pytest.mark.parametrize(("settings", "message"), [
    (["recipe=ppo"], "rl.reward: required"),
    (["recipe=grpo", "rl.reward=length", "rl.num_generations=1"], "rl.num_generations: must be >= 2"),
    (["recipe=ppo", "rl.reward=nosuch"], "reward 'nosuch' unknown"),
])
def test_bad_rl_config_is_a_clear_error_with_exit_2(tmp_path, settings, message):
    files = prompt_files(tmp_path)
    proc = cli_train(tmp_path, f"data.train={files['train']}", f"output_dir={tmp_path / 'run'}",
                     *settings)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
