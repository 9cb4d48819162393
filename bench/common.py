"""Shared pieces of the benchmarks: synthetic data, isolated workers, tables, results, peak FLOP/s.

Everything here imports without torch, TRL or datasets (torch is imported where it is used), so
``tests/test_bench_data.py`` can check the data generator cheaply.

- :func:`make_chat_examples` / :func:`ensure_chat_dataset`: a fixed, seeded chat data set with a
  realistic spread of lengths, written once as JSONL (OpenAI chat format) under ``runs/bench/``.
- :func:`run_worker` / :func:`report`: every contender runs in its own fresh Python process (so its
  peak memory is its own) and reports one JSON object on its last line of stdout.
- :func:`format_table`, :func:`write_results`: aligned text tables, JSON results with a timestamp.
- :func:`matmul_peak`, :func:`model_shape`, :func:`train_flops`: the machine's matmul peak and
  the model FLOPs of a training step, for model FLOPs utilisation (MFU).

``python -m bench.common peak`` prints the matmul peak as JSON (used by ``bench/run_all.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "runs" / "bench"  # runs/ is git-ignored
DATA_DIR = RESULTS_DIR / "data"

# --------------------------------------------------------------------------------------------
# Synthetic chat data
# --------------------------------------------------------------------------------------------

# ~300 everyday English words: text made of them tokenises like real prose (whole-word tokens,
# a few split words), unlike random characters.
VOCABULARY = """
the a an and or but if when while because so then than that this these those there here
what which who how why where can could will would should must may might do does did is
are was were be been being have has had not no yes very more most less many much few some
any every each all both other another same new old good bad great small large long short
high low early late young first last next right left best better important possible real
simple clear ready open close free full empty warm cold quiet busy happy careful quick slow
time year day week month morning evening night hour minute moment today tomorrow yesterday
people person friend family child parent teacher doctor student customer manager team group
company office school house home room door window table chair kitchen garden street city
town country road car train bus ticket station airport hotel shop market store price money
bank account card order delivery package box letter email phone message number name address
question answer problem reason idea plan project report meeting result change choice issue
part place point side end case fact example detail list note page book story paper picture
water food coffee tea bread fruit dinner lunch breakfast meal recipe oven plate cup glass
music film game sport team ball weather rain snow wind sun tree flower river lake mountain
computer screen keyboard printer software update file folder password network internet data
system service support help policy rule law price cost budget bill payment refund discount
make take give get go come see look find know think say tell ask use work call try leave
keep start stop move turn show play run walk read write send pay buy sell bring carry hold
open close wait need want like help change check fix clean cook build plan learn teach
understand explain remember forget finish follow return arrive travel visit meet talk listen
agree decide expect hope offer prepare prefer protect provide receive reduce replace share
always never often sometimes usually already still again soon later together almost really
about above after against along around before behind below between during from into near
over through under until with without within across toward
""".split()

PROMPT_MEDIAN = 120  # tokens of the user's message
PROMPT_SIGMA = 0.6  # log-normal spread: 10th..90th percentile ~ 0.46x..2.2x the median
COMPLETION_MEDIAN = 60  # tokens of the assistant's reply
COMPLETION_SIGMA = 0.7  # 10th..90th percentile ~ 0.41x..2.5x the median
MIN_TOTAL, MAX_TOTAL = 32, 512  # whole conversation after the chat template, in tokens
TOKENS_PER_WORD = 1.3  # estimate used when no tokenizer is given (words and punctuation)
CHAT_OVERHEAD_ESTIMATE = 10  # template tokens around two turns, when no tokenizer is given
POOL_WORDS = 600  # words drawn per message: more than MAX_TOTAL tokens' worth for any tokenizer


def _sentences(rng: random.Random, n_words: int, question_rate: float) -> list[str]:
    """``n_words`` words grouped into sentences (capitalised, commas, full stops, questions)."""
    words: list[str] = []
    while len(words) < n_words:
        length = rng.randint(5, 16)
        sentence = [rng.choice(VOCABULARY) for _ in range(length)]
        sentence[0] = sentence[0].capitalize()
        for i in range(1, length - 1):
            if rng.random() < 0.08:
                sentence[i] += ","
        sentence[-1] += "?" if rng.random() < question_rate else "."
        words.extend(sentence)
    return words[:n_words]


def _cut(pool: list[str], k: int) -> str:
    text = " ".join(pool[:k]).rstrip(",")
    return text if text.endswith((".", "?")) else text + "."


def _fit(pool: list[str], target: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``pool`` (at least one word) whose text has <= ``target`` tokens."""
    limit = max(1, min(len(pool), target))  # every word is at least one token
    lo = hi = 1
    while hi < limit:  # doubling first, so no text much longer than the target is tokenised
        nxt = min(limit, 2 * hi)
        if count(_cut(pool, nxt)) > target:
            hi = nxt - 1
            break
        lo = hi = nxt
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(_cut(pool, mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return _cut(pool, lo)


class TokenCounter:
    """Token counts of message text and of whole rendered conversations.

    With a tokenizer, conversations are rendered with its chat template and tokenised exactly as
    ``tuneforge.data.render.render_sft`` does; without one, counts are estimated from words.
    """

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def text(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, round(len(text.split()) * TOKENS_PER_WORD))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, messages: list[dict]) -> int:
        if self.tokenizer is None:
            return sum(self.text(m["content"]) for m in messages) + CHAT_OVERHEAD_ESTIMATE
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def make_chat_examples(n: int = 256, seed: int = 0, tokenizer=None) -> list[dict]:
    """``n`` two-turn chat records, the same for the same ``(n, seed, tokenizer)``.

    Target lengths (in tokens of ``tokenizer``, or estimated) are log-normal: user messages around
    ``PROMPT_MEDIAN``, replies around ``COMPLETION_MEDIAN``; a conversation that renders outside
    [``MIN_TOTAL``, ``MAX_TOTAL``] tokens is shortened (both turns, in proportion) or its reply
    lengthened until it fits. Record ``i`` depends only on ``seed`` and ``i``.
    """
    counter = TokenCounter(tokenizer)
    records = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        p_target = max(1, round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA)))
        c_target = max(1, round(rng.lognormvariate(math.log(COMPLETION_MEDIAN), COMPLETION_SIGMA)))
        p_pool = _sentences(rng, POOL_WORDS, question_rate=0.4)
        c_pool = _sentences(rng, POOL_WORDS, question_rate=0.05)
        for _ in range(50):
            messages = [{"role": "user", "content": _fit(p_pool, p_target, counter.text)},
                        {"role": "assistant", "content": _fit(c_pool, c_target, counter.text)}]
            total = counter.chat(messages)
            if total > MAX_TOTAL:
                excess = total - MAX_TOTAL
                p_cut = math.ceil(excess * p_target / (p_target + c_target))
                p_target = max(1, p_target - p_cut)
                c_target = max(1, c_target - (excess - p_cut))
            elif total < MIN_TOTAL:
                c_target += MIN_TOTAL - total
            else:
                break
        records.append({"messages": messages})
    return records


def chat_dataset_path(n: int, seed: int, tag: str) -> Path:
    return DATA_DIR / f"sft-chat-{tag}-n{n}-seed{seed}.jsonl"


def ensure_chat_dataset(n: int = 256, seed: int = 0, tokenizer=None, tag: str = "words") -> Path:
    """Write :func:`make_chat_examples` as JSONL (rewritten only if its content would change)."""
    path = chat_dataset_path(n, seed, tag)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                   for r in make_chat_examples(n, seed, tokenizer))
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# Workers: one fresh process per contender, JSON on the last line of stdout
# --------------------------------------------------------------------------------------------


def cold_compile_cache() -> str:
    """Point torch.compile's on-disk caches (Inductor's kernels, FX and AOT graphs) at a fresh
    folder, so that a contender's first step pays the whole compilation, as on a new machine;
    a warm cache makes later runs' first steps shorter. The worker process ends with the run."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (10^9 bytes); ru_maxrss is in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def report(payload: dict) -> None:
    """A worker's result: one JSON line, the last line it writes to stdout."""
    sys.stdout.flush()
    print(json.dumps(payload), flush=True)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(module: str, args: Sequence[str], *, label: str = "") -> dict:
    """Run ``python -m module args`` in a fresh process; return the JSON of its last stdout line.

    The worker's stderr passes straight through; its other stdout lines are echoed to stderr
    (prefixed with ``label``). A worker that fails or reports nothing gives ``{"error": ...}``.
    """
    cmd = [sys.executable, "-m", module, *args]
    prefix = f"[{label}] " if label else ""
    last = None
    with subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            stripped = line.strip()
            if stripped.startswith("{") and stripped.endswith("}"):
                try:
                    last = json.loads(stripped)
                    continue
                except json.JSONDecodeError:
                    pass
            if stripped:
                print(prefix + line.rstrip(), file=sys.stderr, flush=True)
        rc = proc.wait()
    if rc != 0:
        return {"error": f"worker exited with status {rc}: {' '.join(cmd)}"}
    if last is None:
        return {"error": f"worker reported no JSON: {' '.join(cmd)}"}
    return last


# --------------------------------------------------------------------------------------------
# Tables and results
# --------------------------------------------------------------------------------------------

Column = tuple[str, str, str]  # (key, header, format spec such as ".1f" or "" for str)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """An aligned text table: text columns left-aligned, numbers right-aligned."""
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(fmt) for _, _, fmt in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def write_results(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``runs/bench/<name>-<UTC timestamp>.json``; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{timestamp()}.json"
    n = 1
    while path.exists():  # two results in the same second
        n += 1
        path = RESULTS_DIR / f"{name}-{timestamp()}-{n}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def machine_info() -> dict:
    import platform

    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu": platform.processor() or ""}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


# --------------------------------------------------------------------------------------------
# Peak matmul throughput and model FLOPs
# --------------------------------------------------------------------------------------------


def matmul_peak(sizes: Sequence[int] = (2048, 4096), repeats: int = 3,
                dtypes: Sequence[str] = ("float32", "bfloat16")) -> dict:
    """Best GFLOP/s of square ``torch.mm`` over ``sizes`` and ``repeats``, per dtype.

    Uses ``torch.get_num_threads()`` threads (all of them, as training does). A matmul of two
    n x n matrices is 2 n^3 floating-point operations.
    """
    import torch

    out: dict = {"threads": torch.get_num_threads(), "sizes": list(sizes), "repeats": repeats}
    gen = torch.Generator().manual_seed(0)
    for name in dtypes:
        dtype = getattr(torch, name)
        best, best_size = 0.0, None
        for n in sizes:
            a = torch.randn(n, n, generator=gen).to(dtype)
            b = torch.randn(n, n, generator=gen).to(dtype)
            torch.mm(a, b)  # warm-up: kernel selection, page faults
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                seconds = time.perf_counter() - t0
                gflops = 2 * n**3 / seconds / 1e9
                if gflops > best:
                    best, best_size = gflops, n
            del a, b
        out[name] = {"gflops": best, "size": best_size}
    return out


def best_peak(*peaks: dict | None) -> dict | None:
    """Per dtype, the best of several :func:`matmul_peak` results (say, before and after the
    contenders ran: a peak measured while something else used the cores would flatter MFU)."""
    good = [p for p in peaks if p and "error" not in p]
    if not good:
        return None
    out = dict(good[0])
    for dtype in ("float32", "bfloat16"):
        candidates = [p[dtype] for p in good if isinstance(p.get(dtype), dict)]
        if candidates:
            out[dtype] = max(candidates, key=lambda c: c.get("gflops") or 0.0)
    out["measurements"] = sum(p.get("measurements", 1) for p in good)
    return out



def trl_step_timer():
    """A transformers TrainerCallback that notes when each optimizer step begins and ends.

    ``timer.step_seconds()`` gives each step's duration: the first from its own begin, the rest
    from the end of the step before, so that each counts everything the trainer does per step.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            ends = self.end
            return [ends[0] - self.begin[0]] + [ends[i] - ends[i - 1] for i in range(1, len(ends))]

        def timed_since(self, warmup: int) -> float:
            """Seconds from the end of the last warm-up step to the end of the last step."""
            start = self.end[warmup - 1] if warmup else self.begin[0]
            return self.end[-1] - start

    return StepTimer()

def model_shape(model) -> dict:
    """Parameter counts that do matmul work, for :func:`train_flops`.

    ``n_body``: weights of the linear layers of the transformer (frozen or not; adapters
    excluded); ``n_head``: the output projection (counted once even when tied to the input
    embedding, whose lookup costs no FLOPs); ``n_lora``: LoRA A and B matrices; ``n_layers`` and
    ``attn_width`` (heads x head size) for the attention score and value products.
    """
    import torch

    head = model.get_output_embeddings()
    n_body = n_head = n_lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            n_head += module.weight.numel()
        elif "lora_" in name:
            n_lora += module.weight.numel()
        else:
            n_body += module.weight.numel()
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"n_body": n_body, "n_head": n_head, "n_lora": n_lora,
            "n_layers": cfg.num_hidden_layers, "attn_width": heads * head_dim,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def attn_pairs(lengths: Sequence[int]) -> int:
    """(query, key) pairs of causal attention within each sequence: sum of L (L + 1) / 2."""
    return sum(n * (n + 1) // 2 for n in lengths)


def train_flops(shape: dict, method: str, tokens: int, trained_tokens: int, pairs: int) -> float:
    """Model FLOPs of training on ``tokens`` (non-padding) tokens; see bench/README.md.

    Per token, a weight matrix of N parameters costs 2N forward, 2N for the gradient of its
    input and 2N for the gradient of its weight: 6N when trained (full fine-tuning), 4N when
    frozen (LoRA: the base weights), and the LoRA matrices themselves 6N. The output head is
    counted on the trained tokens only (the loss needs logits nowhere else). Attention scores
    and the weighted sum of values cost 4 x width FLOPs per (query, key) pair and layer forward,
    3x that for forward plus backward. Padding and recomputation (gradient checkpointing) are
    not counted: this is the work the model needs, not the work a toolkit happens to do.
    """
    k = 6 if method == "full" else 4
    return float(k * shape["n_body"] * tokens
                 + k * shape["n_head"] * trained_tokens
                 + 6 * shape["n_lora"] * tokens
                 + 3 * 4 * shape["n_layers"] * shape["attn_width"] * pairs)


def mfu(flops: float, seconds: float, peak_gflops: float | None) -> float | None:
    """Model FLOPs utilisation (0..1) against ``peak_gflops``, or None when unknown."""
    if not peak_gflops or not seconds:
        return None
    return flops / seconds / (peak_gflops * 1e9)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="command", required=True)
    peak = sub.add_parser("peak", help="print this machine's fp32 and bf16 matmul peak as JSON")
    peak.add_argument("--sizes", default="2048,4096")
    peak.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "peak":
        sizes = [int(s) for s in args.sizes.split(",") if s]
        report(matmul_peak(sizes, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
