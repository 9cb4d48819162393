"""Export figures on the built-in model: time, file sizes, and whether greedy outputs match.

    python bench/export.py                            # trains a 2-step LoRA run first
    python bench/export.py --run runs/demo            # or exports an existing run
    python bench/export.py --llama-cpp-python /path/to/python   # also run the GGUFs in llama.cpp

Exports the run merged (safetensors, f32) and as GGUF (``--types``, default f16,q8_0), timing
each :func:`tuneforge.export.export_run` call (load, merge, convert, write, hash). Then loads each
output the way a user outside tuneforge would (plain transformers; GGUF through transformers'
GGUF loader, de-quantised to float32) and generates greedy continuations of 5 prompts
(``--new-tokens``), compared with the tuned PEFT model token by token.

``--llama-cpp-python`` names a Python interpreter that has ``llama_cpp`` (llama-cpp-python, not a
tuneforge dependency); each GGUF is then also tokenised and run greedily in llama.cpp itself,
from the same prompt text. Prints a table and writes ``runs/bench/export-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import format_table, machine_info, write_results  # noqa: E402
from bench.generate import conversations, run_baseline  # noqa: E402
from tuneforge.data.render import render_prompt  # noqa: E402
from tuneforge.export import export_run  # noqa: E402
from tuneforge.models.runs import load_for_inference  # noqa: E402

N_PROMPTS = 5

# Runs inside the llama-cpp-python interpreter: prompt text in, llama.cpp's tokens and greedy
# continuation out. Special tokens in the text (<|im_start|>) are parsed as such, no BOS added.
LLAMA_CPP_WORKER = """
import json, sys
from llama_cpp import Llama
path, texts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=1024, verbose=False, seed=0)
out = []
for text in texts:
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    new = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        new.append(tok)
        if tok == llm.token_eos() or len(new) == n:
            break
    out.append({"prompt_ids": ids, "new": new})
print(json.dumps(out))
"""


def train_short_run(folder: Path) -> Path:
    """A 2-step LoRA run on the built-in model (enough to move the weights off the base)."""
    from helpers import chat_records, write_jsonl  # tests/helpers.py: small chat records

    from tuneforge.config import load_config
    from tuneforge.recipes.sft import run_sft

    data = write_jsonl(folder.parent / "export-bench-train.jsonl", chat_records(16))
    run_sft(load_config(None, base={
        "output_dir": str(folder), "model": {"name": "builtin:smollm2-135m-instruct"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16}, "data": {"train": str(data)},
        "train": {"batch_size": 2, "max_steps": 2, "lr": 1e-3, "eval_every": 0, "save_every": 0,
                  "progress": False},
    }), overwrite=True)
    return folder


def timed_export(run: Path, out: Path, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = export_run(run, out, overwrite=True, **kw)
    return time.perf_counter() - start, manifest


def compare(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """How many prompts give the reference's tokens, and where the others first differ."""
    first_diff = []
    for got, want in zip(outputs, reference):
        pos = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                   None if len(got) == len(want) else min(len(got), len(want)))
        first_diff.append(pos)
    return {"same": sum(d is None for d in first_diff), "prompts": len(reference),
            "first_difference": first_diff}


def load_export(folder: Path, gguf_file: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return model.eval(), tokenizer


def run_llama_cpp(python: str, gguf_path: Path, texts: list[str], n: int) -> list[dict]:
    proc = subprocess.run([python, "-c", LLAMA_CPP_WORKER, str(gguf_path), json.dumps(texts), str(n)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder (default: train a 2-step run)")
    parser.add_argument("--types", default="f16,q8_0", help="GGUF types to export")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-cpp-python", help="an interpreter with llama_cpp installed")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))

    work = Path(tempfile.mkdtemp(prefix="tuneforge-export-bench-"))
    run = args.run or train_short_run(work / "run")
    model, tokenizer, description = load_for_inference(str(run))
    convs = conversations(N_PROMPTS)
    _, _, reference = run_baseline(model, tokenizer, convs, args.new_tokens)
    texts = [tokenizer.decode(render_prompt(c, tokenizer)) for c in convs]
    del model

    rows = []
    targets = [("merged f32", {"merge": True}, None)] + [
        (f"gguf {t}", {"fmt": "gguf", "dtype": t}, f"model-{t}.gguf") for t in args.types.split(",")]
    for label, options, gguf_file in targets:
        out = work / label.replace(" ", "-")
        seconds, manifest = timed_export(run, out, **options)
        size = sum(f["bytes"] for f in manifest["files"].values())
        exported, exported_tok = load_export(out, gguf_file)
        same_prompt = all(render_prompt(c, exported_tok) == render_prompt(c, tokenizer) for c in convs)
        _, _, outputs = run_baseline(exported, exported_tok, convs, args.new_tokens)
        row = {"export": label, "seconds": seconds, "mb": size / 1e6, "prompt_ids_same": same_prompt,
               "transformers": compare(outputs, reference)}
        if gguf_file and args.llama_cpp_python:
            results = run_llama_cpp(args.llama_cpp_python, out / gguf_file, texts, args.new_tokens)
            row["llama_cpp_prompt_ids_same"] = all(
                r["prompt_ids"] == render_prompt(c, tokenizer) for r, c in zip(results, convs))
            row["llama_cpp"] = compare([r["new"] for r in results], reference)
        rows.append(row)
        del exported

    table = [{**r, "hf": f"{r['transformers']['same']}/{r['transformers']['prompts']}",
              "cpp": (f"{r['llama_cpp']['same']}/{r['llama_cpp']['prompts']}" if "llama_cpp" in r
                      else None)} for r in rows]
    print(f"\n{description}: greedy, {args.new_tokens} new tokens, {N_PROMPTS} prompts")
    print(format_table(table, [("export", "export", ""), ("seconds", "export s", ".1f"),
                               ("mb", "MB", ".1f"), ("prompt_ids_same", "same prompt ids", ""),
                               ("hf", "= tuned (transformers)", ""), ("cpp", "= tuned (llama.cpp)", "")]))
    path = write_results("export", {"benchmark": "export", "run": str(run), "model": description,
                                    "new_tokens": args.new_tokens, "rows": rows,
                                    "machine": machine_info()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
