"""Model loading from every source; the built-in model (marked `builtin`) for real."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tuneforge.errors import ModelLoadError
from tuneforge.models.loading import load_model, load_tokenizer

BUILTIN = "builtin:smollm2-135m-instruct"


def test_tiny_models_are_deterministic_and_small():
    a, tok = load_model("tiny:llama")
    b, _ = load_model("tiny:llama")
    assert sum(p.numel() for p in a.parameters()) < 200_000
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    for arch in ("qwen2", "mistral"):
        model, _ = load_model(f"tiny:{arch}")
        assert model.config.model_type == arch


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny:llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([tok.encode("hello")])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("spec,fragment", [
    ("HuggingFaceTB/SmolLM2-135M", "no access to a model hub"),
    ("tiny:gpt9", "unknown tiny model"),
    ("builtin:nope", "unknown built-in model"),
    ("/no/such/folder", "not found"),
    ("missing.gguf", "no such GGUF file"),
])
def test_bad_model_specs_explain_what_to_give(spec, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_cli_reports_hub_id_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "generate", "meta-llama/Llama-3-8B",
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no access to a model hub" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.builtin
def test_builtin_model_loads_generates_and_matches_the_gguf():
    from tuneforge.generation import generate_reply
    from tuneforge.models.builtin import builtin_gguf_path

    model, tok = load_model(BUILTIN)
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = generate_reply(model, tok, messages, max_new_tokens=12)
    assert "Paris" in reply
    # the cached safetensors copy equals the GGUF it came from
    direct, _ = load_model(str(builtin_gguf_path("smollm2-135m-instruct")))
    assert generate_reply(direct, tok, messages, max_new_tokens=12) == reply


@pytest.mark.builtin
def test_builtin_model_lora_training_steps(tmp_path):
    from tuneforge.config import AdapterConfig, TrainConfig
    from tuneforge.data.example import Example, Message
    from tuneforge.data.render import render_sft
    from tuneforge.models.adapters import prepare_model
    from tuneforge.train.loop import train

    model, tok = load_model(BUILTIN)
    model = prepare_model(model, AdapterConfig(method="lora", r=4, alpha=8))
    ex = Example("mem", 1, "chat", messages=[Message("user", "Route: my card was charged twice"),
                                             Message("assistant", "Department: Billing")])
    data = [render_sft(ex, tok)] * 2
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # two steps: LoRA's B starts at zero, so A only gets a gradient from the second step on
    result = train(model, data, [], TrainConfig(batch_size=2, max_steps=2, progress=False,
                                                eval_every=0, save_every=0), tmp_path)
    assert result.steps == 2 and 0 < result.final_loss < 20
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
