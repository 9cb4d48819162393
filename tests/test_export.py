"""`tuneforge export`: adapter, merged model and GGUF files that load elsewhere and match the run.

Each exported form is loaded back the way a user outside tuneforge would (plain transformers,
PEFT, transformers' GGUF loader, gguf's reader) and compared with the tuned model on the same
prompts: identical greedy tokens, and logits equal within the rounding the format implies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import chat_records, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.render import render_prompt
from tuneforge.export import ExportError, export_run
from tuneforge.export.gguf_file import check_architecture
from tuneforge.export.gguf_vocab import vocab_from_tokenizer
from tuneforge.models.loading import load_model
from tuneforge.models.runs import load_for_inference
from tuneforge.recipes.sft import run_sft

PROMPTS = [[{"role": "user", "content": f"item {i}: what colour is it?"}] for i in (1, 5, 30)]


def train_run(folder: Path, model: str, method: str = "lora", steps: int = 6) -> Path:
    """A real `tuneforge train` run on a tiny model (a few seconds)."""
    data = write_jsonl(folder.parent / f"{folder.name}-train.jsonl", chat_records(32))
    adapter = {"method": method, "r": 4, "alpha": 8} if method != "full" else {"method": "full"}
    config = load_config(None, base={
        "output_dir": str(folder), "model": {"name": model}, "adapter": adapter,
        "data": {"train": str(data)},
        "train": {"batch_size": 4, "max_steps": steps, "lr": 3e-3, "bf16": "false",
                  "eval_every": 0, "save_every": 0, "warmup_steps": 1, "progress": False},
    })
    run_sft(config)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("runs") / "lora-llama", "tiny:llama")


@pytest.fixture(scope="module")
def tuned(lora_run):
    """The run as tuneforge itself serves it: base model with the PEFT adapter on top."""
    model, tokenizer, _ = load_for_inference(str(lora_run))
    return model, tokenizer


@pytest.fixture(scope="module")
def merged_f32(lora_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "merged"
    export_run(lora_run, out, merge=True)
    return out


@torch.no_grad()
def logits_and_greedy(model, tokenizer, new_tokens: int = 12) -> tuple[list[torch.Tensor], list]:
    """Per prompt: (last-position logits over the prompt, greedy continuation token ids)."""
    logits, greedy = [], []
    for messages in PROMPTS:
        ids = torch.tensor([render_prompt(messages, tokenizer)])
        logits.append(model(ids).logits[0].float())
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(out[0, ids.shape[1]:].tolist())
    return logits, greedy


def load_gguf(folder: Path, name: str):
    """A GGUF file through transformers' loader, de-quantised to float32."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def assert_same_outputs(got, want, atol: float) -> None:
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert got[1] == want[1]


def test_merged_export_loads_in_plain_transformers_and_matches_the_tuned_model(
        tuned, merged_f32, lora_run):
    model, tokenizer = tuned
    reference = logits_and_greedy(model, tokenizer)
    base = logits_and_greedy(*load_model("tiny:llama"))
    # the adapter moved the model, so matching the tuned model is not matching the base
    assert max((a - b).abs().max().item() for a, b in zip(reference[0], base[0])) > 1e-3

    merged = AutoModelForCausalLM.from_pretrained(merged_f32).eval()
    merged_tok = AutoTokenizer.from_pretrained(merged_f32)
    assert merged_tok.chat_template == tokenizer.chat_template
    # W + BA is summed in another order than W x + B(A x): equal up to float32 rounding
    assert_same_outputs(logits_and_greedy(merged, merged_tok), reference, atol=1e-5)

    config = json.loads((merged_f32 / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["rope_theta"] == 10000.0  # for 4.x readers
    manifest = json.loads((merged_f32 / "export.json").read_text())
    assert manifest["kind"] == "merged" and manifest["run"] == str(lora_run.resolve())
    for name, info in manifest["files"].items():
        assert sha256((merged_f32 / name).read_bytes()).hexdigest() == info["sha256"], name


LOAD_WITHOUT_TUNEFORGE = """
import json, sys
sys.modules["tuneforge"] = None  # any import of tuneforge fails: the files must stand alone
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf_file = sys.argv[1], sys.argv[2] or None
tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
out = []
for messages in json.loads(sys.argv[3]):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    out.append(new[0, ids.shape[1]:].tolist())
print(json.dumps(out))
"""


def test_merged_and_gguf_exports_need_no_tuneforge_to_load(tuned, merged_f32, lora_run, tmp_path):
    export_run(lora_run, tmp_path / "gguf", fmt="gguf", dtype="f32")
    want = logits_and_greedy(*tuned)[1]
    for folder, name in ((merged_f32, ""), (tmp_path / "gguf", "model-f32.gguf")):
        proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TUNEFORGE, str(folder), name,
                               json.dumps(PROMPTS)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.splitlines()[-1]) == want, folder


def test_adapter_export_loads_with_peft(tuned, lora_run, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    export_run(lora_run, tmp_path / "adapter")
    base, tokenizer = load_model("tiny:llama")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_same_outputs(logits_and_greedy(model, tokenizer), logits_and_greedy(*tuned), atol=0)

    export_run(lora_run, tmp_path / "adapter-bf16", dtype="bf16")
    with safe_open(tmp_path / "adapter-bf16" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    manifest = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["base_model"] == "tiny:llama"


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_gguf_matches_the_merged_model_at_the_same_precision(lora_run, tmp_path, dtype):
    """A float GGUF holds exactly the merged weights rounded to its type: same logits, same tokens."""
    export_run(lora_run, tmp_path / "gguf", fmt="gguf", dtype=dtype)
    if dtype == "f32":
        merged = tmp_path / "gguf"  # compared with the merged model in memory below
        reference = logits_and_greedy(*load_for_inference(str(lora_run))[:2])
    else:
        export_run(lora_run, tmp_path / "merged", merge=True, dtype=dtype)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        reference = logits_and_greedy(merged.eval(), AutoTokenizer.from_pretrained(tmp_path / "merged"))
    model, tokenizer = load_gguf(tmp_path / "gguf", f"model-{dtype}.gguf")
    assert_same_outputs(logits_and_greedy(model, tokenizer), reference, atol=1e-5)


def test_gguf_metadata_read_back_with_gguf_reader(lora_run, tuned, tmp_path):
    export_run(lora_run, tmp_path / "q8", fmt="gguf", dtype="q8_0")
    reader = gguf.GGUFReader(tmp_path / "q8" / "model-q8_0.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokenizer = tuned[1]
    assert field("general.architecture") == "llama"
    assert field("general.name") == lora_run.name
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 259 and tokens[tokenizer.eos_token_id] == "<|im_end|>"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.merges") == []  # the tiny vocabulary has none: every byte a token
    assert field("llama.attention.head_count_kv") == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay exact
    assert "output.weight" in types  # tiny models do not tie the output head
    assert (tmp_path / "q8" / "Modelfile").read_text().splitlines() == [
        "FROM ./model-q8_0.gguf", 'PARAMETER stop "<|im_end|>"']


def test_gguf_q8_0_is_the_merged_model_with_q8_0_rounded_weights(lora_run, tmp_path):
    """Q8_0 loses precision, so compare twice: exactly against the merged weights rounded the
    same way (proves names, layout and metadata), and within a tolerance against the float model
    (how much the rounding costs; on this tiny random model the logits move by ~1% of their range).
    """
    export_run(lora_run, tmp_path / "q8", fmt="gguf", dtype="q8_0")
    model, tokenizer = load_gguf(tmp_path / "q8", "model-q8_0.gguf")
    got = logits_and_greedy(model, tokenizer)

    merged, _, _ = load_for_inference(str(lora_run))
    merged = merged.merge_and_unload()
    exact = logits_and_greedy(merged, tokenizer)
    with torch.no_grad():
        for param in merged.parameters():
            if param.dim() == 2:
                q8 = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(
                    gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)))
    assert_same_outputs(got, logits_and_greedy(merged, tokenizer), atol=1e-5)
    for a, b in zip(got[0], exact[0]):
        assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_gguf_other_architectures(tmp_path, arch):
    run = train_run(tmp_path / f"lora-{arch}", f"tiny:{arch}", steps=2)
    export_run(run, tmp_path / "gguf", fmt="gguf", dtype="f32")
    model, tokenizer = load_gguf(tmp_path / "gguf", "model-f32.gguf")
    reference = logits_and_greedy(*load_for_inference(str(run))[:2])
    assert_same_outputs(logits_and_greedy(model, tokenizer), reference, atol=1e-5)


def test_full_finetune_run_exports_merged_and_gguf(tmp_path):
    run = train_run(tmp_path / "full", "tiny:llama", method="full", steps=2)
    export_run(run, tmp_path / "merged")  # no --merge needed: the run is a whole model
    assert json.loads((tmp_path / "merged" / "export.json").read_text())["kind"] == "merged"
    export_run(run, tmp_path / "gguf", fmt="gguf", dtype="f32")
    reference = logits_and_greedy(*load_for_inference(str(run))[:2])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_same_outputs(logits_and_greedy(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")),
                        reference, atol=0)
    model, tokenizer = load_gguf(tmp_path / "gguf", "model-f32.gguf")
    assert_same_outputs(logits_and_greedy(model, tokenizer), reference, atol=1e-5)


def test_gguf_refuses_what_it_cannot_write():
    for config, words in (
        (AutoConfig.for_model("gpt_neox"), "supports llama, mistral, qwen2"),
        (AutoConfig.for_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1e4}), "rope scaling"),
        (AutoConfig.for_model("mistral", sliding_window=16, max_position_embeddings=64),
         "sliding-window"),
    ):
        with pytest.raises(ExportError, match=words):
            check_architecture(config)

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0)])))
    with pytest.raises(ExportError, match="byte-level BPE"):
        vocab_from_tokenizer(unigram, vocab_size=1)


def cli(*args: str) -> int:
    return main(["export", *args])


def test_cli_errors_exit_2_with_a_message(lora_run, tmp_path, capsys):
    cases = [
        ((str(tmp_path), "--out", str(tmp_path / "o")), "not a tuneforge run folder"),
        ((str(lora_run), "--out", str(tmp_path / "o"), "--format", "onnx"), "--format 'onnx' unknown"),
        ((str(lora_run), "--out", str(tmp_path / "o"), "--dtype", "q8_0"),
         "not available for --format safetensors"),
    ]
    for args, message in cases:
        assert cli(*args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_never_clobbers_a_folder_that_is_not_an_export(lora_run, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert cli(str(lora_run), "--out", str(keep)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli(str(lora_run), "--out", str(keep), "--overwrite") == 2
    assert "not a tuneforge export" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious"

    out = tmp_path / "export"
    assert cli(str(lora_run), "--out", str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "adapter" and "adapter_model.safetensors" in printed["files"]
    assert cli(str(lora_run), "--out", str(out), "--merge", "--overwrite") == 0
    assert json.loads((out / "export.json").read_text())["kind"] == "merged"
    assert not (out / "adapter_config.json").exists()  # replaced whole, not mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]  # no temp folders left


@pytest.mark.builtin
def test_builtin_run_exports_merged_and_q8_0_gguf_with_the_same_greedy_output(tmp_path):
    run = train_run(tmp_path / "run", "builtin:smollm2-135m-instruct", steps=2)
    export_run(run, tmp_path / "merged", merge=True)
    export_run(run, tmp_path / "q8", fmt="gguf", dtype="q8_0")
    reader = gguf.GGUFReader(tmp_path / "q8" / "model-q8_0.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # from the source GGUF
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied head stored once

    tuned = logits_and_greedy(*load_for_inference(str(run))[:2], new_tokens=16)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert logits_and_greedy(merged, tokenizer, new_tokens=16)[1] == tuned[1]
    model, gguf_tokenizer = load_gguf(tmp_path / "q8", "model-q8_0.gguf")
    for messages in PROMPTS:  # the GGUF's own tokenizer and template give the same prompt ids
        assert render_prompt(messages, gguf_tokenizer) == render_prompt(messages, tokenizer)
    assert logits_and_greedy(model, gguf_tokenizer, new_tokens=16)[1] == tuned[1]


def test_tokenizer_table_pads_to_the_embedding_rows(tuned):
    vocab = vocab_from_tokenizer(tuned[1], vocab_size=264)
    assert vocab.tokens[259:] == [f"[PAD{i}]" for i in range(259, 264)]
    assert set(vocab.token_types[259:]) == {gguf.TokenType.UNUSED}
    assert vocab.token_types[:3] == [gguf.TokenType.CONTROL] * 3  # ChatML specials
    assert np.array_equal(vocab.token_types[3:259], [gguf.TokenType.NORMAL] * 256)
    assert vocab.pre == "default" and not vocab.add_bos and not vocab.add_eos
    with pytest.raises(ExportError, match="does not belong to this model"):
        vocab_from_tokenizer(tuned[1], vocab_size=100)
