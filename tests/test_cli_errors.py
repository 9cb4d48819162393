"""User errors end in a clear message and exit 2, never a traceback, and lose nothing saved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import chat_records, write_jsonl


def tuneforge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True,
                          text=True, timeout=300, input=stdin)


def config(tmp: Path, train: Path, **extra) -> Path:
    cfg = tmp / "c.yaml"
    data = {"train": str(train), **extra}
    cfg.write_text(f"model: {{name: 'tiny:llama'}}\ndata: {json.dumps(data)}\n"
                   "train: {max_steps: 2, batch_size: 2, progress: false, bf16: 'false'}\n")
    return cfg


def test_train_stops_on_bad_data_with_file_line_before_loading_the_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(chat_records(1)[0])
    bad.write_text(f"{good}\n{{not json\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    proc = tuneforge("train", str(config(tmp_path, bad)), "--set", f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:2" in proc.stderr and f"{bad}:3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_refuses_leakage_between_train_and_test(tmp_path):
    records = chat_records(6)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    test = write_jsonl(tmp_path / "test.jsonl", records[4:])
    proc = tuneforge("train", str(config(tmp_path, train, test=str(test))),
                     "--set", f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and f"{test}:1" in proc.stderr, proc.stderr


def test_too_long_examples_are_listed_or_handled_by_policy(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(6))
    cfg = config(tmp_path, train, max_length=30)
    proc = tuneforge("train", str(cfg), "--set", f"output_dir={tmp_path / 'a'}")
    assert proc.returncode == 2 and "too long after templating" in proc.stderr
    assert f"{train}:1: " in proc.stderr and "data.too_long=truncate" in proc.stderr
    ok = tuneforge("train", str(cfg), "--set", f"output_dir={tmp_path / 'b'}",
                   "--set", "data.too_long=truncate", "--set", "data.max_length=50")
    assert ok.returncode == 0, ok.stderr


def test_bad_config_lists_every_problem(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    proc = tuneforge("train", str(config(tmp_path, train)), "--set", "train.lrr=1",
                     "--set", "adapter.r=0")
    assert proc.returncode == 2
    assert "train.lrr: unknown key; did you mean train.lr?" in proc.stderr
    assert "adapter.r: must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_run_is_not_clobbered(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    proc = tuneforge("train", str(config(tmp_path, train)), "--set", f"output_dir={run}")
    assert proc.returncode == 2 and (run / "precious.txt").read_text() == "keep me"


def test_data_check_cli_end_to_end(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    proc = tuneforge("data", "check", str(bad))
    assert proc.returncode == 2 and f"{bad}:2: prompt" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    good = write_jsonl(tmp_path / "good.jsonl", chat_records(5))
    proc = tuneforge("data", "check", str(good), "--model", "tiny:llama", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = json.loads(proc.stdout)
    assert "train" in json.dumps(stats)


def test_chat_reads_turns_from_stdin():
    proc = tuneforge("chat", "tiny:llama", "--max-new-tokens", "3", stdin="hello\n/reset\nagain\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 2


def test_generate_rejects_bad_sampling_settings():
    proc = tuneforge("generate", "tiny:llama", "--prompt", "x", "--temperature", "-1")
    assert proc.returncode == 2 and "--temperature" in proc.stderr


def test_fsdp_without_gpus_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine FSDP is a valid choice
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    proc = tuneforge("train", str(config(tmp_path, train)), "--set", "train.distributed=fsdp",
                     "--set", f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "fsdp needs GPUs" in proc.stderr
