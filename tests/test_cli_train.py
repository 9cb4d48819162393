"""`tuneforge train` end to end on a tiny model: run folder, resume after SIGKILL, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import chat_records, write_jsonl
from safetensors.torch import load_file

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def write_config(tmp: Path, **train) -> Path:
    write_jsonl(tmp / "train.jsonl", chat_records(32))
    write_jsonl(tmp / "val.jsonl", chat_records(40)[32:])
    settings = {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "bf16": "false", "eval_every": 3,
                "save_every": 3, "warmup_steps": 1, **train}
    cfg = tmp / "run.yaml"
    cfg.write_text(
        "model: {name: 'tiny:llama', dropout: 0.1}\n"
        "adapter: {method: lora, r: 4, alpha: 8, dropout: 0.1}\n"
        f"data: {{train: {tmp / 'train.jsonl'}, validation: {tmp / 'val.jsonl'}}}\n"
        f"train: {json.dumps(settings)}\n"
    )
    return cfg


def tuneforge(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True,
                          text=True, env=ENV, timeout=300, **kw)


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_train_writes_a_complete_run_folder(tmp_path):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    proc = tuneforge("train", str(cfg), "--set", f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 6 and summary["best_val_loss"] is not None
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run / name).is_file(), name
    assert [s for s, _ in losses(run)] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    # the output is usable: generate from the run folder
    gen = tuneforge("generate", str(run), "--prompt", "item 1: what colour is it?",
                    "--max-new-tokens", "5", "--json")
    assert gen.returncode == 0, gen.stderr
    assert "reply" in json.loads(gen.stdout.splitlines()[0])
    # a second train into the same folder refuses rather than clobbering it
    again = tuneforge("train", str(cfg), "--set", f"output_dir={run}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr


PPO_REWARD = """
def letters(prompts, completions, **columns):
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in c) / max(1, len(c))
            for c in completions]
"""


def write_ppo_config(tmp: Path, **train) -> Path:
    """A PPO run on prompts with a reward file: its step is one rollout and its updates."""
    (tmp / "reward.py").write_text(PPO_REWARD)
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": r["messages"][:1]} for r in chat_records(16)])
    settings = {"batch_size": 4, "lr": 1e-2, "bf16": "false", "eval_every": 0,
                "warmup_steps": 0, **train}
    cfg = tmp / "ppo.yaml"
    cfg.write_text(
        "recipe: ppo\nmodel: {name: 'tiny:llama'}\nadapter: {method: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {tmp / 'prompts.jsonl'}}}\n"
        f"rl: {{reward: '{tmp / 'reward.py'}:letters', max_new_tokens: 6, ppo_epochs: 1, "
        "minibatches: 1}\n"
        f"train: {json.dumps(settings)}\n"
    )
    return cfg


@pytest.mark.parametrize("recipe,steps", [("sft", 150), ("ppo", 40)])
def test_resume_after_sigkill_continues_the_same_loss_trajectory(tmp_path, recipe, steps):
    """SFT (one global batch a step) and PPO (one rollout and its updates a step) are killed
    mid-run and resumed through the same run lifecycle: the same losses, no step lost or
    doubled, the same final weights."""
    write = write_config if recipe == "sft" else write_ppo_config
    cfg = write(tmp_path, max_steps=steps, eval_every=0, save_every=4, keep_last=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert tuneforge("train", str(cfg), "--set", f"output_dir={straight}").returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--set",
                             f"output_dir={killed}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = [s for s, _ in losses(killed)]
    assert 10 <= len(done) < steps

    resumed = tuneforge("train", str(cfg), "--set", f"output_dir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = losses(straight), losses(killed)
    assert [s for s, _ in b] == list(range(1, steps + 1))  # no step lost, none doubled
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], rel=1e-6, abs=1e-7)
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(killed / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
    if recipe == "ppo":  # the value head is checkpointed with the adapter
        torch.testing.assert_close(load_file(straight / "adapter" / "value_head.safetensors"),
                                   load_file(killed / "adapter" / "value_head.safetensors"),
                                   rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path)
    proc = tuneforge("train", str(cfg), "--set", f"output_dir={tmp_path / 'none'}", "--resume")
    assert proc.returncode == 2 and "no checkpoint to resume from" in proc.stderr


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    pytest.importorskip("accelerate")
    cfg = write_config(tmp_path, max_steps=4, eval_every=2, save_every=2)
    one, two = tmp_path / "one", tmp_path / "two"
    # dropout off: each process draws its own dropout masks, which would differ from one process
    common = ["--set", "model.dropout=0.0", "--set", "adapter.dropout=0.0"]
    single = tuneforge("train", str(cfg), "--set", f"output_dir={one}", "--set",
                       "train.batch_size=4", *common)
    assert single.returncode == 0, single.stderr
    launch = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneforge", "train", str(cfg), "--set", f"output_dir={two}",
         "--set", "train.batch_size=2", *common],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "x2" in launch.stderr  # the run reported two processes
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)
    val = [[r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r] for run in (one, two)]
    assert val[0] == pytest.approx(val[1], rel=1e-5)
    wa = load_file(one / "adapter" / "adapter_model.safetensors")
    wb = load_file(two / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
