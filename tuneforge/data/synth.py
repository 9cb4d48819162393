"""``tuneforge data synth``: grow a seed data set with a teacher model.

Three modes, each writing records in a format the rest of tuneforge reads:

- ``instruct`` (self-instruct): show the teacher a few random seed instructions, ask it for a
  new one, then have it answer that; records keep the seed's format (chat, prompt/completion
  or alpaca).
- ``paraphrase`` (classification seeds, ``text`` + ``label``): label-preserving rewrites. Each
  new text is scored back into a label by the teacher (a local teacher by label likelihood,
  exactly as ``tuneforge eval`` scores; an HTTP teacher is asked to pick a label) and is kept
  only when that label is the original one.
- ``preference`` (any file with prompts): ``k`` sampled responses per prompt, ordered by a
  reward function or a reward-model run, written as pairs (best vs worst) or rankings.

The teacher is a model spec or run folder (generating through the project's batched decode
loop, :func:`tuneforge.generation.generate_rows`) or any OpenAI-compatible endpoint
(``tuneforge serve`` included). Every candidate record is written to a scratch file and read
back with the same parser as ``data check`` (a record that does not parse is dropped), then
deduplicated, exactly and by near-duplicate Jaccard, against the seed set, the records already
made and the ``--validation``/``--test`` files: no evaluation example leaks into the output.

Sampling is seeded per attempt: attempt ``a`` samples from a random stream fixed by
``(--seed, a)`` alone, so the output does not depend on timing, and a run can be resumed.
OUT grows one complete, fsynced line at a time; ``OUT.synth-state`` (rewritten atomically
after every round of ``--batch-size`` attempts) holds the options and the next round. Run the
same command again after a crash or SIGKILL: a torn last line is dropped, the interrupted
round is generated again (its records already in OUT are recognised, not written twice), and
the finished file is what an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.example import Example, Message
from tuneforge.data.formats import load_examples, load_prompts, parse_examples
from tuneforge.data.near_duplicates import DEFAULT_THRESHOLD, near_matches
from tuneforge.data.validate import example_key
from tuneforge.errors import ConfigError, DataError, TuneforgeError

MODES = ("instruct", "paraphrase", "preference")
OUTPUT_FORMATS = ("pairs", "rankings")
DEFAULT_TEACHER = "builtin:smollm2-135m-instruct"
STATE_SUFFIX = ".synth-state"
STATE_VERSION = 1
# Why a candidate was not written; the summary counts each.
DROP_REASONS = ("empty", "invalid", "leak", "duplicate", "near_duplicate", "label_changed",
                "identical", "tie")

INSTRUCT_PROMPT = (
    "Here are some tasks from a data set:\n\n{examples}\n\n"
    "Write one new task in the same style and domain, different from all of the above. "
    "Reply with the new task only: no answer, no number, no heading."
)
PARAPHRASE_PROMPT = (
    "Rewrite the text below in other words. Keep its meaning, language and tone; change the "
    "wording. Reply with the rewritten text only.\n\nText:\n{text}"
)
CLASSIFY_PROMPT = (
    "Which one of these labels fits the text below? Labels: {labels}.\n"
    "Reply with the label only.\n\nText:\n{text}"
)
_LEAD_IN = re.compile(
    r"^(?:(?:new|rewritten)\s+)?(?:task|instruction|text|paraphrase|label)\s*\d*\s*[:.)-]\s*",
    re.IGNORECASE,
)

# Small teachers go on listing tasks after the new one: "...\n\nTask 4:\n...". Cut there.
_NEXT_TASK = re.compile(r"\n\s*(?:new\s+)?task\s*\d*\s*:", re.IGNORECASE)


class TeacherError(TuneforgeError):
    """The teacher cannot be reached, refuses, or gives nothing usable."""


# ------------------------------------------------------------------------------------ options


@dataclass
class SynthOptions:
    """Everything ``data synth`` is told; see ``tuneforge data synth --help`` for each."""

    seed_file: str
    out: str
    num: int
    mode: str = "instruct"
    teacher: str | None = None
    teacher_url: str | None = None
    teacher_model: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    k: int = 4
    reward: str | None = None
    reward_model: str | None = None
    judge: str | None = None
    output_format: str = "pairs"
    shots: int = 3
    near_threshold: float = DEFAULT_THRESHOLD
    precision: str = "auto"
    patience: int = 64
    max_attempts: int | None = None
    progress: bool = True

    # Options that do not change what is generated: a resumed run may change them.
    TRANSIENT = ("api_key", "timeout", "patience", "max_attempts", "progress")

    def check(self) -> None:
        """ConfigError listing every problem with the options."""
        p = []
        if self.mode not in MODES:
            p.append(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        for name, value, least in (("--num", self.num, 1), ("--batch-size", self.batch_size, 1),
                                   ("--max-new-tokens", self.max_new_tokens, 1),
                                   ("--k", self.k, 2), ("--shots", self.shots, 1),
                                   ("--patience", self.patience, 1)):
            if value < least:
                p.append(f"{name} must be at least {least}, got {value}")
        if self.max_attempts is not None and self.max_attempts < 1:
            p.append(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.near_threshold <= 1:
            p.append(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
        if self.timeout <= 0:
            p.append(f"--timeout must be > 0 seconds, got {self.timeout}")
        if not self.teacher_url:
            from tuneforge.generation.inference_copy import PRECISIONS

            if self.precision not in PRECISIONS:
                p.append(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.teacher and self.teacher_url:
            p.append("give --teacher (a local model or run) or --teacher-url, not both")
        if self.judge and self.mode != "paraphrase":
            p.append("--judge scores paraphrases back into their label: it goes with --mode paraphrase")
        if self.output_format not in OUTPUT_FORMATS:
            p.append(f"--output-format {self.output_format!r}: use pairs or rankings")
        if self.mode == "preference":
            if bool(self.reward) == bool(self.reward_model):
                p.append("--mode preference orders responses by --reward NAME|module:fn|"
                         "file.py:fn or by --reward-model RUN: give one of them")
            if self.temperature == 0:
                p.append("--mode preference samples --k responses per prompt: greedy decoding "
                         "(--temperature 0) makes them all the same; use --temperature > 0")
        elif self.reward or self.reward_model:
            p.append("--reward and --reward-model only apply to --mode preference")
        if p:
            raise ConfigError("data synth: " + "\n  ".join(p) if len(p) == 1
                              else "data synth options:\n  " + "\n  ".join(p))

    @property
    def teacher_spec(self) -> str:
        return self.teacher or DEFAULT_TEACHER

    @property
    def attempt_limit(self) -> int:
        return self.max_attempts or 20 * self.num + self.patience

    def fingerprint(self) -> dict[str, Any]:
        """The options that shape the output, with the input files' hashes: a resumed run
        must match them."""
        kept = {k: v for k, v in asdict(self).items() if k not in self.TRANSIENT}
        kept["teacher"] = None if self.teacher_url else self.teacher_spec
        kept["seed_file"] = [self.seed_file, _sha256(self.seed_file)]
        kept["validation"] = [[p, _sha256(p)] for p in self.validation]
        kept["test"] = [[p, _sha256(p)] for p in self.test]
        kept.pop("out")
        return kept


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # reported when the file is read


def request_seed(seed: int, stream: int) -> int:
    """The sampling seed of one generation: fixed by the run's seed and the stream alone.

    A local teacher and ``tuneforge serve`` turn the same seed into the same random stream,
    so both sample the same text from the same model.
    """
    return (seed * 1_000_003 + stream) % 2**31


# ------------------------------------------------------------------------------------ teachers


@dataclass(frozen=True)
class Request:
    """One generation: a conversation, its random stream and its sampling settings."""

    messages: list[dict]
    stream: int
    temperature: float
    max_new_tokens: int


@dataclass(frozen=True)
class Reply:
    """What the teacher said: ``text`` to use ("" when unusable) and ``raw``, what came back."""

    text: str
    raw: str


@dataclass
class LabelTask:
    """The labels a paraphrase must be scored into, and the seed records that show their
    layout (a local teacher scores them exactly as ``tuneforge eval`` does)."""

    labels: list[str]
    examples: list[Example]
    spec: Any = None


class LocalTeacher:
    """A model spec or run folder (with its adapter), generating in batches in this process."""

    def __init__(self, spec: str, *, seed: int, top_p: float, batch_size: int, precision: str):
        from tuneforge.models.runs import load_for_inference

        self.model, self.tokenizer, self.description = load_for_inference(spec)
        self.spec = spec
        self.seed, self.top_p, self.batch_size, self.precision = seed, top_p, batch_size, precision
        eos = self.tokenizer.eos_token_id
        self.stop_ids = [eos] if eos is not None else []
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids or [0])[0]

    def chat(self, requests: Sequence[Request]) -> list[Reply]:
        from tuneforge.data.render import render_prompt
        from tuneforge.generation import RowSettings, generate_rows, inference_model

        run_model, autocast = inference_model(self.model, self.precision)
        run_model.eval()
        replies: list[Reply] = []
        for lo in range(0, len(requests), self.batch_size):
            chunk = requests[lo : lo + self.batch_size]
            prompts = [render_prompt(r.messages, self.tokenizer) for r in chunk]
            settings = [RowSettings(r.max_new_tokens, r.temperature, self.top_p,
                                    request_seed(self.seed, r.stream), 0) for r in chunk]
            rows = generate_rows(run_model, prompts, settings, stop_token_ids=self.stop_ids,
                                 pad_id=self.pad_id, autocast=autocast)
            for ids, _ in rows:
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                replies.append(Reply(text, text))
        return replies

    def labels_of(self, texts: Sequence[str], task: LabelTask) -> list[str | None]:
        """The label each text scores highest on, as ``tuneforge eval`` scores a test set."""
        from tuneforge.config import TaskConfig
        from tuneforge.data.templates import apply_template, prompt_and_reference
        from tuneforge.eval.classify import classify
        from tuneforge.eval.tasks import resolve_task

        template = self.template()
        if task.spec is None:
            config = TaskConfig(name="synth", type="classification", labels=task.labels)
            seeds = [apply_template(ex, template) for ex in task.examples]
            task.spec = resolve_task(config, seeds, [], self.tokenizer)
        spec = task.spec
        label = spec.labels[0]
        prompts = [prompt_and_reference(apply_template(
            Example("synth", 0, "classification", messages=[
                Message("user", t), Message("assistant", label)], label=label), template))[0]
            for t in texts]
        scores = classify(self.model, self.tokenizer, prompts, [label] * len(texts),
                          spec.labels, prefix=spec.prefix, suffix=spec.suffix)
        return list(scores.predicted)

    def template(self):
        """The prompt template a run folder was trained with (its single task's), so that a
        tuned teacher judges a text as ``tuneforge eval`` would; None for a plain model."""
        from tuneforge.config import task_configs
        from tuneforge.eval.evaluate import read_run_config

        config = read_run_config(self.spec) if Path(self.spec).is_dir() else None
        tasks = task_configs(config) if config is not None else []
        return tasks[0].template if len(tasks) == 1 else None


class RemoteTeacher:
    """An OpenAI-compatible ``/v1`` endpoint (``tuneforge serve``, vLLM, a hosted API)."""

    def __init__(self, url: str, *, model: str | None, api_key: str | None, timeout: float,
                 seed: int, top_p: float, concurrency: int):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.timeout, self.seed, self.top_p = timeout, seed, top_p
        self.concurrency = concurrency
        self.model = model or self._first_model()
        self.description = f"{self.model} at {self.url}"

    def _call(self, method: str, path: str, **kwargs: Any):
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as err:
            raise TeacherError(f"the teacher at {self.url} refused the connection ({err}); is "
                               "the server running? (start one with `tuneforge serve MODEL`)"
                               ) from err
        except httpx.TimeoutException as err:
            raise TeacherError(f"the teacher at {self.url} did not answer {method} {path} within "
                               f"{self.timeout:g} s (raise --timeout for a slow teacher)"
                               ) from err
        except httpx.HTTPError as err:
            raise TeacherError(f"the teacher at {self.url}: {type(err).__name__}: {err}") from err
        if response.status_code >= 400:
            raise TeacherError(f"the teacher at {self.url} answered {method} {path} with HTTP "
                               f"{response.status_code}: {_excerpt(response.text)}")
        return response

    def _first_model(self) -> str:
        response = self._call("GET", "/models")
        try:
            return response.json()["data"][0]["id"]
        except (ValueError, LookupError, TypeError) as err:
            raise TeacherError(f"the teacher at {self.url}: GET /models gave no model id "
                               f"({_excerpt(response.text)}); name one with --teacher-model"
                               ) from err

    def _one(self, request: Request) -> Reply:
        body = {"model": self.model, "messages": request.messages,
                "temperature": request.temperature, "top_p": self.top_p,
                "max_tokens": request.max_new_tokens,
                "seed": request_seed(self.seed, request.stream)}
        response = self._call("POST", "/chat/completions", json=body)
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            return Reply("", f"unparseable reply {_excerpt(response.text)}")
        if not isinstance(content, str):
            return Reply("", f"content {json.dumps(content)[:80]}")
        return Reply(content.strip(), content)

    def chat(self, requests: Sequence[Request]) -> list[Reply]:
        # Requests go out together, so a batching server runs them as one batch.
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def labels_of(self, texts: Sequence[str], task: LabelTask) -> list[str | None]:
        """The label the teacher names for each text (None when it names none of them)."""
        longest = max(len(label) for label in task.labels)
        requests = [Request([{"role": "user", "content": CLASSIFY_PROMPT.format(
            labels=", ".join(task.labels), text=t)}], 0, 0.0, min(64, longest + 16))
            for t in texts]
        return [_match_label(reply.text, task.labels) for reply in self.chat(requests)]


def _match_label(text: str, labels: Sequence[str]) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    said = _LEAD_IN.sub("", lines[0].strip()) if lines else ""
    said = said.strip().strip("\"'`*.").strip().casefold()
    return next((label for label in labels if label.casefold() == said), None)


def _excerpt(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    if not text:
        return "(empty)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def make_teacher(opts: SynthOptions, say: Callable[[str], None]) -> LocalTeacher | RemoteTeacher:
    if opts.teacher_url:
        teacher = RemoteTeacher(opts.teacher_url, model=opts.teacher_model, api_key=opts.api_key,
                                timeout=opts.timeout, seed=opts.seed, top_p=opts.top_p,
                                concurrency=opts.batch_size)
    else:
        say(f"loading the teacher {opts.teacher_spec}")
        teacher = LocalTeacher(opts.teacher_spec, seed=opts.seed, top_p=opts.top_p,
                               batch_size=opts.batch_size, precision=opts.precision)
    say(f"teacher: {teacher.description}")
    if opts.judge:  # paraphrases are scored back by another model (e.g. a tuned classifier run)
        say(f"loading the judge {opts.judge}")
        judge = LocalTeacher(opts.judge, seed=opts.seed, top_p=opts.top_p,
                             batch_size=opts.batch_size, precision=opts.precision)
        say(f"judge: {judge.description}")
        teacher.labels_of = judge.labels_of
    return teacher


# ------------------------------------------------------------------------------------ reading


def read_examples(path: str, *, prompts_first: bool = False) -> list[Example]:
    """Every record of a data file in any format (prompt-only files included); DataError with
    file:line problems, from whichever reader fits the file better."""
    readers = (load_prompts, load_examples) if prompts_first else (load_examples, load_prompts)
    try:
        return readers[0](path)
    except DataError as first:
        try:
            return readers[1](path)
        except DataError:
            raise first from None


def prompt_messages(example: Example) -> list[dict]:
    """The conversation a model is asked, whatever the record's format."""
    from tuneforge.data.templates import prompt_and_reference

    if example.prompt_messages is not None:
        return [{"role": m.role, "content": m.content} for m in example.prompt_messages]
    prompt, _ = prompt_and_reference(example)
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def input_text(example: Example) -> str:
    """The user's side of a record (instruction, text, prompt): what a leak would repeat."""
    if example.prompt is not None and example.messages is None:
        return example.prompt
    return "\n".join(m["content"] for m in prompt_messages(example) if m["role"] == "user")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _clean(text: str) -> str:
    """A reply without a lead-in ("New task:") or quotes around it."""
    text = _LEAD_IN.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


# ------------------------------------------------------------------------------------ modes


@dataclass
class Candidate:
    """One attempt's outcome: a record to write, or why there is none."""

    attempt: int
    record: dict | None = None
    reason: str | None = None
    raw: str = ""


class InstructMode:
    """Self-instruct: a new instruction from a few seed ones, then the teacher's answer."""

    streams = 2  # the instruction, then the answer
    checks_seed = True  # a new instruction must not repeat a seed instruction

    def __init__(self, opts: SynthOptions, examples: list[Example]):
        formats = {ex.format for ex in examples}
        if not formats <= {"chat", "prompt_completion", "alpaca", "prompt"}:
            hint = " (use --mode paraphrase)" if "classification" in formats else ""
            raise DataError(f"{opts.seed_file}: --mode instruct grows chat, prompt/completion, "
                            f"alpaca or prompt-only records, not {', '.join(sorted(formats))}"
                            + hint)
        self.opts = opts
        # Instructions alone (prompt-only records) grow into chat records.
        self.format = "chat" if examples[0].format == "prompt" else examples[0].format
        self.instructions = list(dict.fromkeys(input_text(ex) for ex in examples))
        self.seed_inputs = self.instructions
        systems = {tuple(m["content"] for m in prompt_messages(ex) if m["role"] == "system")
                   for ex in examples}
        self.system = next(iter(systems))[0] if len(systems) == 1 and next(iter(systems)) else None
        self.raw_text = all(ex.messages is None for ex in examples)  # raw prompt/completion
        completions = [ex.completion or "" for ex in examples]
        self.lead = " " if self.raw_text and all(c[:1].isspace() for c in completions) else ""

    @property
    def data_format(self) -> str:
        return self.format

    def candidates(self, teacher, attempts: Sequence[int]) -> list[Candidate]:
        o = self.opts
        asks = []
        for a in attempts:
            rng = random.Random(f"{o.seed}:{a}")
            shots = rng.sample(self.instructions, min(o.shots, len(self.instructions)))
            examples = "\n\n".join(f"Task {i}:\n{text}" for i, text in enumerate(shots, 1))
            prompt = INSTRUCT_PROMPT.format(examples=examples)
            asks.append(Request([{"role": "user", "content": prompt}], 2 * a, o.temperature,
                                o.max_new_tokens))
        out = [Candidate(a) for a in attempts]
        instructions = {}
        for cand, reply in zip(out, teacher.chat(asks)):
            cand.raw = reply.raw
            text = _clean(_NEXT_TASK.split(reply.text, maxsplit=1)[0])
            if text:
                instructions[cand.attempt] = text
            else:
                cand.reason = "empty"
        answers = [Request(self._conversation(text), 2 * a + 1, o.temperature, o.max_new_tokens)
                   for a, text in instructions.items()]
        replies = iter(teacher.chat(answers))
        for cand in out:
            if cand.attempt not in instructions:
                continue
            reply = next(replies)
            if not reply.text:
                cand.reason, cand.raw = "empty", reply.raw
            else:
                cand.record = self._record(instructions[cand.attempt], reply.text)
        return out

    def _conversation(self, instruction: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": instruction}]

    def _record(self, instruction: str, answer: str) -> dict:
        if self.format == "alpaca":
            return {"instruction": instruction, "input": "", "output": answer}
        if self.format == "prompt_completion" and self.raw_text:
            return {"prompt": instruction, "completion": self.lead + answer}
        messages = self._conversation(instruction) + [{"role": "assistant", "content": answer}]
        if self.format == "prompt_completion":
            return {"prompt": messages[:-1], "completion": messages[-1:]}
        return {"messages": messages}


class ParaphraseMode:
    """Label-preserving rewrites of classification texts, confirmed by the teacher's label."""

    streams = 1
    checks_seed = True  # a paraphrase identical to a seed text adds nothing
    data_format = "classification"

    def __init__(self, opts: SynthOptions, examples: list[Example]):
        formats = {ex.format for ex in examples}
        if formats != {"classification"}:
            raise DataError(f"{opts.seed_file}: --mode paraphrase rewrites classification "
                            f"records (text + label), not {', '.join(sorted(formats))}")
        labels = list(dict.fromkeys(ex.label for ex in examples))
        if len(labels) < 2:
            raise DataError(f"{opts.seed_file}: --mode paraphrase checks each new text against "
                            f"the label set, which needs at least two labels (found {labels})")
        self.opts = opts
        self.examples = examples
        self.task = LabelTask(labels, examples)
        self.seed_inputs = [input_text(ex) for ex in examples]
        self.order = list(range(len(examples)))
        random.Random(f"{opts.seed}:order").shuffle(self.order)

    def candidates(self, teacher, attempts: Sequence[int]) -> list[Candidate]:
        o = self.opts
        sources = [self.examples[self.order[a % len(self.order)]] for a in attempts]
        asks = [Request([{"role": "user", "content": PARAPHRASE_PROMPT.format(
            text=input_text(ex))}], a, o.temperature, o.max_new_tokens)
            for a, ex in zip(attempts, sources)]
        out = []
        for a, ex, reply in zip(attempts, sources, teacher.chat(asks)):
            text = _clean(reply.text)
            out.append(Candidate(a, {"text": text, "label": ex.label} if text else None,
                                 None if text else "empty", reply.raw))
        kept = [c for c in out if c.record is not None]
        if kept:
            predicted = teacher.labels_of([c.record["text"] for c in kept], self.task)
            for cand, label in zip(kept, predicted):
                if label != cand.record["label"]:
                    text, wanted = cand.record["text"], cand.record["label"]
                    cand.raw = f"{text} (scored {label!r}, not {wanted!r})"
                    cand.record, cand.reason = None, "label_changed"
        return out


@dataclass
class _Prompt:
    messages: list[dict]
    text: str  # the last user message: what reward functions read as the prompt
    columns: dict


class PreferenceMode:
    """``k`` sampled responses per prompt, ordered by a reward; pairs or rankings."""

    checks_seed = False  # the prompts are the seed's own

    def __init__(self, opts: SynthOptions, examples: list[Example]):
        self.opts = opts
        self.streams = opts.k
        self.prompts = []
        for ex in examples:
            messages = prompt_messages(ex)
            users = [m["content"] for m in messages if m["role"] == "user"]
            self.prompts.append(_Prompt(messages, users[-1] if users else "", dict(ex.extra)))
        self.seed_inputs: list[str] = []
        self.data_format = "preference" if opts.output_format == "pairs" else "ranking"
        self.score = self._scorer()

    def _scorer(self) -> Callable[[list[_Prompt], list[str]], list[float]]:
        if self.opts.reward:
            from tuneforge.rewards import call_reward, load_reward_fn

            fn = load_reward_fn(self.opts.reward)

            def by_function(prompts: list[_Prompt], texts: list[str]) -> list[float]:
                keys = sorted({k for p in prompts for k in p.columns})
                columns = {k: [p.columns.get(k) for p in prompts] for k in keys}
                return call_reward(fn, [p.text for p in prompts], texts, columns)

            return by_function
        import torch

        from tuneforge.models.heads import load_reward_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorer = load_reward_model(self.opts.reward_model, device=device,
                                   batch_size=self.opts.batch_size)
        return lambda prompts, texts: scorer.score([p.messages for p in prompts], texts)

    def candidates(self, teacher, attempts: Sequence[int]) -> list[Candidate]:
        o = self.opts
        chosen = [self.prompts[a % len(self.prompts)] for a in attempts]
        asks = [Request(p.messages, a * o.k + j, o.temperature, o.max_new_tokens)
                for a, p in zip(attempts, chosen) for j in range(o.k)]
        replies = teacher.chat(asks)
        texts = [r.text for r in replies]
        usable = [i for i, t in enumerate(texts) if t]
        scores = dict(zip(usable, self.score([chosen[i // o.k] for i in usable],
                                             [texts[i] for i in usable])))
        out = []
        for n, (a, p) in enumerate(zip(attempts, chosen)):
            group = range(n * o.k, (n + 1) * o.k)
            raw = next((replies[i].raw for i in group if not texts[i]), replies[group[0]].raw)
            out.append(self._ranked(Candidate(a, raw=raw), p,
                                    [(texts[i], scores[i]) for i in group if i in scores]))
        return out

    def _ranked(self, cand: Candidate, prompt: _Prompt,
                scored: list[tuple[str, float]]) -> Candidate:
        if not scored:
            cand.reason = "empty"
            return cand
        distinct: dict[str, tuple[str, float]] = {}
        for text, score in scored:
            distinct.setdefault(_normal(text), (text, score))
        if len(distinct) < 2:
            cand.reason = "identical"
            return cand
        ranked = sorted(distinct.values(), key=lambda ts: -ts[1])  # stable for ties
        if self.opts.output_format == "pairs":
            (best, high), (worst, low) = ranked[0], ranked[-1]
            if high == low:
                cand.reason = "tie"
                return cand
            cand.record = {"prompt": prompt.messages, "chosen": [_assistant(best)],
                           "rejected": [_assistant(worst)]}
            return cand
        by_score: dict[float, str] = {}
        for text, score in ranked:
            by_score.setdefault(score, text)  # a tie inside a ranking says nothing: keep one
        if len(by_score) < 2:
            cand.reason = "tie"
            return cand
        cand.record = {"prompt": prompt.messages,
                       "responses": [[_assistant(t)] for t in by_score.values()],
                       "scores": list(by_score)}
        return cand


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def make_mode(opts: SynthOptions) -> InstructMode | ParaphraseMode | PreferenceMode:
    """The mode, with its seed file read (DataError listing file:line problems)."""
    examples = read_examples(opts.seed_file, prompts_first=opts.mode == "preference")
    if not examples:
        raise DataError(f"{opts.seed_file}: no records to start from")
    modes = {"instruct": InstructMode, "paraphrase": ParaphraseMode,
             "preference": PreferenceMode}
    return modes[opts.mode](opts, examples)


# ------------------------------------------------------------------------------------ dedup


class Deduplicator:
    """Decides whether a new record repeats anything: evaluation inputs (a leak), seed inputs,
    or a record already made (exact after lowercasing and collapsing whitespace, or near:
    shingle Jaccard at least ``threshold``, from :mod:`tuneforge.data.near_duplicates`).

    Each record is compared by two texts: its ``input`` (instruction, text, prompt) against
    the evaluation and seed sets, and its ``own`` text against records made before within its
    ``group`` (the instruction itself; for preference data the responses to the same prompt,
    since pairs for one prompt share it by design).
    """

    def __init__(self, threshold: float, references: dict[str, list[str]]):
        self.threshold = threshold
        self.ref_texts = [t for texts in references.values() for t in texts]
        self.ref_kinds = [k for k, texts in references.items() for _ in texts]
        self.ref_exact = {}
        for kind, text in zip(self.ref_kinds, self.ref_texts):
            self.ref_exact.setdefault(_normal(text), kind)
        self.made: dict[str, list[str]] = defaultdict(list)
        self.made_exact: set[tuple[str, str]] = set()

    def add(self, group: str, own: str) -> None:
        self.made[group].append(own)
        self.made_exact.add((group, _normal(own)))

    def verdicts(self, items: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """For each ``(input, group, own)`` in order: the drop reason, or None to keep it;
        kept items count as made for the items after them (call :meth:`add` for each)."""
        inputs = [i for i, _, _ in items]
        near_ref: dict[int, list[int]] = defaultdict(list)
        for i, j, _ in near_matches(inputs, self.ref_texts, self.threshold):
            near_ref[i].append(j)
        near_made: set[int] = set()
        near_self: dict[int, set[int]] = defaultdict(set)
        by_group: dict[str, list[int]] = defaultdict(list)
        for n, (_, group, _) in enumerate(items):
            by_group[group].append(n)
        for group, members in by_group.items():
            owns = [items[n][2] for n in members]
            near_made |= {members[i] for i, _, _ in near_matches(owns, self.made[group],
                                                                 self.threshold)}
            for i, j, _ in near_matches(owns, owns, self.threshold):
                if i != j:
                    near_self[members[i]].add(members[j])
        out: list[str | None] = []
        kept: set[int] = set()
        kept_exact: set[tuple[str, str]] = set()
        for n, (text, group, own) in enumerate(items):
            exact_kind = self.ref_exact.get(_normal(text))
            kinds = {exact_kind} | {self.ref_kinds[j] for j in near_ref[n]}
            key = (group, _normal(own))
            if kinds & {"validation", "test"}:
                reason = "leak"
            elif exact_kind == "seed" or key in self.made_exact or key in kept_exact:
                reason = "duplicate"
            elif "seed" in kinds or n in near_made or near_self[n] & kept:
                reason = "near_duplicate"
            else:
                reason = None
                kept.add(n)
                kept_exact.add(key)
            out.append(reason)
        return out


def _dedup_texts(example: Example, mode) -> tuple[str, str, str]:
    """``(input, group, own)`` of a record for :class:`Deduplicator`."""
    text = input_text(example)
    if isinstance(mode, PreferenceMode):
        responses = "\n".join(m.content for r in example.responses or [] for m in r)
        return text, _normal(text), responses
    return text, "", text


# ------------------------------------------------------------------------------------ OUT


class SynthFile:
    """OUT, grown one complete fsynced line at a time, and its state file beside it."""

    def __init__(self, path: str | Path, fingerprint: dict, num: int, data_format: str):
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + STATE_SUFFIX)
        self.fingerprint, self.num, self.data_format = fingerprint, num, data_format
        self.state: dict[str, Any] = {"round": 0, "written": 0, "since_accept": 0,
                                      "counters": {}}
        self.examples: list[Example] = []
        self.pending: set[str] = set()  # records of the interrupted round, already in OUT
        self._handle = None

    @property
    def count(self) -> int:
        return len(self.examples)

    def open(self, say: Callable[[str], None]) -> None:
        """Pick up where an earlier run stopped, or check that a fresh start loses nothing."""
        if not self.state_path.is_file():
            if self.path.exists() and self.path.stat().st_size > 0:
                raise ConfigError(f"{self.path} exists and was not written by data synth (there "
                                  f"is no {self.state_path.name} beside it); synth never "
                                  "overwrites a file: choose another --out")
            return
        try:
            saved = json.loads(self.state_path.read_text())
            if not {"options", "round", "written"} <= set(saved):
                raise ValueError("keys missing")
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{self.state_path}: unreadable synth state ({err}); delete it and "
                            f"{self.path.name} to start again") from err
        if not self.path.exists():  # OUT was removed: start again
            self.state_path.unlink()
            return
        if saved["options"] != self.fingerprint:
            raise ConfigError(f"{self.path} was started by data synth with other options; "
                              "rerun the same command to continue it, or choose another --out:\n"
                              + _differences(saved["options"], self.fingerprint))
        self._drop_torn_tail(say)
        examples, problems = (parse_examples(self.path, self.data_format)
                              if self.path.stat().st_size else ([], []))
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise DataError(f"{errors[0]}: OUT was changed since data synth wrote it; fix it or "
                            "choose another --out")
        if not saved["written"] <= len(examples) <= self.num:
            raise DataError(f"{self.path} holds {len(examples)} records, but its state says "
                            f"{saved['written']} were written (of {self.num}): it was edited; "
                            "choose another --out")
        self.state = {k: saved.get(k, v) for k, v in self.state.items()}
        self.examples = examples
        self.pending = {example_key(ex) for ex in examples[saved["written"] :]}
        say(f"resuming {self.path}: {len(examples)} of {self.num} records there")

    def _drop_torn_tail(self, say: Callable[[str], None]) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.truncate(self.path, keep)
            say(f"dropped a torn last line of {self.path} ({len(data) - keep} bytes): a run was "
                "killed while writing it")

    def append(self, line: str, example: Example) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.state_path.is_file():  # before OUT exists: a kill now leaves both
                self._write_state()
            self._handle = open(self.path, "ab")  # noqa: SIM115 - held for the whole run
        self._handle.write(line.encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.examples.append(example)

    def save(self, **state: Any) -> None:
        """Rewrite the state file atomically (only once OUT exists: nothing to resume before)."""
        self.state.update(state)
        if self.path.exists():
            self._write_state()

    def _write_state(self) -> None:
        payload = {"version": STATE_VERSION, "options": self.fingerprint, **self.state,
                   "written": self.count}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(payload, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _differences(before: dict, now: dict) -> str:
    lines = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            lines.append(f"  --{key.replace('_', '-')}: {json.dumps(before.get(key))} then, "
                         f"{json.dumps(now.get(key))} now")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the run


def synth(opts: SynthOptions, say: Callable[[str], None] | None = None) -> dict:
    """Grow ``opts.seed_file`` into ``opts.num`` records in ``opts.out``; the summary.

    Raises TuneforgeError for bad options, unreadable data, an unreachable or useless teacher
    and a run that ends short of ``num`` records (whatever was written stays in OUT).
    """
    from tqdm import tqdm

    say = say or (lambda text: print(f"tuneforge: {text}", file=sys.stderr))
    opts.check()
    mode = make_mode(opts)
    references = {"seed": mode.seed_inputs if mode.checks_seed else []}
    for split in ("validation", "test"):
        references[split] = [input_text(ex) for path in getattr(opts, split)
                             for ex in read_examples(path)]
    out = SynthFile(opts.out, opts.fingerprint(), opts.num, mode.data_format)
    out.open(say)
    counters = Counter(out.state["counters"])
    start_count = out.count
    if out.count < opts.num:
        teacher = make_teacher(opts, say)
        dedup = Deduplicator(opts.near_threshold, references)
        for ex in out.examples:
            dedup.add(*_dedup_texts(ex, mode)[1:])
        bar = tqdm(total=opts.num, initial=out.count, unit="record", desc="synth",
                   file=sys.stderr, disable=not opts.progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        try:
            _run(opts, mode, teacher, dedup, out, counters, bar)
        finally:
            bar.close()
            out.close()
    summary = {"out": str(out.path), "mode": opts.mode, "records": out.count,
               "new_records": out.count - start_count, "target": opts.num,
               "attempts": out.state["round"] * opts.batch_size,
               "dropped": {r: counters[r] for r in DROP_REASONS if counters[r]},
               "state_file": str(out.state_path)}
    return summary


def _run(opts: SynthOptions, mode, teacher, dedup: Deduplicator, out: SynthFile,
         counters: Counter, bar) -> None:
    """Rounds of ``batch_size`` attempts until OUT holds ``num`` records."""
    recent: deque[str] = deque(maxlen=3)  # what the teacher said lately, for the error message
    since_accept = out.state["since_accept"]
    lost: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-synth-") as scratch:
        round_no = out.state["round"]
        while out.count < opts.num:
            first = round_no * opts.batch_size
            if first >= opts.attempt_limit:
                raise TuneforgeError(_short_message(opts, out, counters, first))
            attempts = range(first, first + opts.batch_size)
            candidates = mode.candidates(teacher, attempts)
            recent.extend(c.raw for c in candidates if c.reason is not None)
            accepted = _accept(candidates, mode, dedup, out, counters, Path(scratch), bar)
            lost.update(c.reason for c in candidates if c.reason is not None)
            since_accept = 0 if accepted else since_accept + len(candidates)
            round_no += 1
            out.save(round=round_no, since_accept=since_accept, counters=dict(counters))
            bar.set_postfix(attempts=round_no * opts.batch_size, dropped=sum(counters.values()),
                            refresh=False)
            if since_accept >= opts.patience and out.count < opts.num:
                raise TeacherError(_junk_message(opts, out, since_accept, lost, recent))
            if accepted:
                lost.clear()


def _accept(candidates: list[Candidate], mode, dedup: Deduplicator, out: SynthFile,
            counters: Counter, scratch: Path, bar) -> int:
    """Check, deduplicate and append the round's records, in attempt order; how many were new
    or already in OUT from the interrupted round."""
    lines = {c.attempt: json.dumps(c.record, ensure_ascii=False) + "\n"
             for c in candidates if c.record is not None}
    parsed = _parse_lines(list(lines.values()), mode.data_format, scratch)
    examples = dict(zip(lines, parsed))
    fresh = []
    accepted = 0
    for cand in candidates:
        if cand.record is None:
            continue
        example = examples[cand.attempt]
        if example is None:
            cand.record, cand.reason = None, "invalid"
        elif example_key(example) in out.pending:  # written before the interruption
            out.pending.discard(example_key(example))
            accepted += 1
        else:
            fresh.append(cand)
    verdicts = dedup.verdicts([_dedup_texts(examples[c.attempt], mode) for c in fresh])
    for cand, reason in zip(fresh, verdicts):
        if reason is not None:
            cand.record, cand.reason = None, reason
            continue
        example = examples[cand.attempt]
        dedup.add(*_dedup_texts(example, mode)[1:])
        if out.count < out.num:
            out.append(lines[cand.attempt], example)
            bar.update(1)
            accepted += 1
    counters.update(c.reason for c in candidates if c.reason is not None)
    return accepted


def _parse_lines(lines: list[str], data_format: str, scratch: Path) -> list[Example | None]:
    """Each line read back as ``data check`` reads a file: its Example, or None if it has an
    error (a record the format does not accept is never written)."""
    if not lines:
        return []
    path = scratch / "round.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    examples, problems = parse_examples(path, data_format)
    bad = {p.line for p in problems if p.severity == "error"}
    by_line = {ex.line: ex for ex in examples}
    return [None if n in bad else by_line.get(n) for n in range(1, len(lines) + 1)]


def _dropped(counter: Counter) -> str:
    parts = [f"{counter[r]} {r.replace('_', ' ')}" for r in DROP_REASONS if counter[r]]
    return ", ".join(parts) or "none"


def _junk_message(opts: SynthOptions, out: SynthFile, attempts: int, lost: Counter,
                  recent: deque) -> str:
    said = "; ".join(_excerpt(r, 80) for r in recent) or "nothing"
    kept = (f"{out.path} keeps the {out.count} records made so far" if out.count
            else "nothing was written")
    return (f"the teacher gave nothing usable in the last {attempts} attempts (dropped: "
            f"{_dropped(lost)}); it said lately: {said}. Check the teacher (--teacher, "
            f"--teacher-url, --teacher-model), its settings (--temperature, --max-new-tokens) "
            f"and the seed data; {kept}.")


def _short_message(opts: SynthOptions, out: SynthFile, attempts: int, counters: Counter) -> str:
    got = (f"only {out.count} of {opts.num} records ({out.path} keeps them; rerun with a larger "
           "--max-attempts to continue)" if out.count else "no record survived the filters")
    return (f"data synth stopped after {attempts} attempts (--max-attempts) with {got}; "
            f"dropped: {_dropped(counters)}")


def render_summary(summary: dict) -> str:
    """One paragraph for a person."""
    dropped = _dropped(Counter(summary["dropped"]))
    return (f"synth: {summary['records']} of {summary['target']} records in {summary['out']} "
            f"({summary['new_records']} new) after {summary['attempts']} attempts; "
            f"dropped: {dropped}")


# ------------------------------------------------------------------------------------ the CLI


def add_synth_parser(commands: Any) -> None:
    """Add ``data synth`` to the ``data`` command's subparsers."""
    p = commands.add_parser(
        "synth", help="grow a seed data set with a teacher model (instruct, paraphrase, "
                      "preference)",
        description="Generate new records from a seed file with a teacher model. Records are "
                    "format-checked and deduplicated against the seed, each other and the "
                    "--validation/--test files. Run the same command again to resume.")
    p.add_argument("seed_file", metavar="SEED", help="seed data (.jsonl, .csv, .tsv, .parquet)")
    p.add_argument("--out", required=True, help="output JSONL (grown, resumable)")
    p.add_argument("--num", type=int, required=True, help="records OUT ends with")
    p.add_argument("--mode", choices=MODES, default="instruct",
                   help="instruct: new instruction/answer pairs; paraphrase: label-preserving "
                        "rewrites of text+label records; preference: ranked samples per prompt")
    p.add_argument("--teacher", help=f"model spec or run folder (default {DEFAULT_TEACHER})")
    p.add_argument("--teacher-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--teacher-model", help="model id at --teacher-url (default: its first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="key for --teacher-url (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    p.add_argument("--validation", nargs="+", action="extend", default=[], metavar="F",
                   help="validation files: nothing in them may appear in OUT")
    p.add_argument("--test", nargs="+", action="extend", default=[], metavar="F",
                   help="test files: nothing in them may appear in OUT")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampled choice")
    p.add_argument("--batch-size", type=int, default=8, help="attempts generated together")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--shots", type=int, default=3,
                   help="instruct: seed instructions shown per new one")
    p.add_argument("--k", type=int, default=4, help="preference: responses sampled per prompt")
    p.add_argument("--reward", help="preference: reward NAME, module:fn or file.py:fn")
    p.add_argument("--reward-model", metavar="RUN", help="preference: a reward-model run")
    p.add_argument("--judge", metavar="MODEL",
                   help="paraphrase: the model or run folder that scores each new text back into "
                        "its label (default: the teacher); a run is judged with its own template, "
                        "as tuneforge eval scores it")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="pairs",
                   help="preference: best vs worst pairs, or rankings with scores")
    p.add_argument("--near-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="word 3-gram Jaccard at which two texts count as near-duplicates")
    p.add_argument("--precision", default="auto",
                   help="local teacher's inference precision: auto, fp32, bf16 or autocast")
    p.add_argument("--patience", type=int, default=64,
                   help="stop after this many attempts in a row give nothing usable")
    p.add_argument("--max-attempts", type=int,
                   help="stop after this many attempts in all (default 20 x --num + patience)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    from tuneforge.data.report import add_report_options

    add_report_options(p)
    p.set_defaults(func=synth_command)


def synth_command(args: argparse.Namespace) -> int:
    """Run ``data synth``; 0 with ``--num`` records in OUT, 2 (a message, no traceback) else."""
    names = SynthOptions.__dataclass_fields__
    opts = SynthOptions(**{k: v for k, v in vars(args).items() if k in names})
    try:
        summary = synth(opts)
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))
    from tuneforge.data.report import report_of_output

    try:  # OUT is complete; the report is of it, with the files it must not leak into
        report_of_output(opts.out, args, validation=opts.validation, test=opts.test)
    except TuneforgeError as err:
        print(f"error: quality report: {err}", file=sys.stderr)
        return 2
    return 0
