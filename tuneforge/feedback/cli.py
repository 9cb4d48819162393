"""``tuneforge feedback``: collect human judgements in the terminal, export them, count them.

``collect`` generates K candidates per prompt with a model (when a prompt first comes up, so
nothing is generated twice) and asks, reading answers line by line from stdin:

- ``rate``: a 1-5 rating for each candidate in turn;
- ``choose``: the best candidate, by letter (``a`` or ``b`` when K is 2);
- ``rank``: every candidate, best first, as numbers (``2 1 3``).

``s`` skips the prompt, ``q`` (or end of input, or Ctrl-C) stops; every answer is committed to
the database as it is given, so running the same command again continues with the first
unanswered item. A bad answer is explained and asked again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tuneforge.errors import ConfigError
from tuneforge.feedback.export import DATA_FORMAT, EXPORT_TARGETS, export_feedback
from tuneforge.feedback.store import (
    MODES,
    RATING_SCALE,
    Candidate,
    FeedbackStore,
    Prompt,
    Session,
    now,
)

DEFAULT_K = {"rate": 2, "choose": 2, "rank": 3}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_RULE = "-" * 72


class Quit(Exception):
    """The annotator asked to stop (``q``, end of input)."""


SKIP = object()  # what Terminal.ask returns when the annotator skips


# ------------------------------------------------------------------------------ answers


def parse_rating(text: str) -> int:
    low, high = RATING_SCALE
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise ValueError(f"a rating is a whole number from {low} to {high}")
    return int(text)


def parse_choice(text: str, k: int) -> int:
    """The index of the chosen candidate, from its letter."""
    letters = _LETTERS[:k]
    if len(text) != 1 or text.lower() not in letters:
        raise ValueError(f"answer with one letter: {' or '.join(letters)}")
    return letters.index(text.lower())


def parse_ranking(text: str, k: int) -> list[int]:
    """Candidate indexes best first, from numbers like ``2 1 3``, ``2,1,3``, ``2>1>3`` or
    ``213`` (when every candidate number is one digit)."""
    parts = re.split(r"[\s,>]+", text.strip())
    if len(parts) == 1 and k < 10 and text.isdigit():
        parts = list(text)
    expected = list(range(1, k + 1))
    example = " ".join(str(n) for n in reversed(expected))
    if not all(p.isdigit() for p in parts) or sorted(int(p) for p in parts) != expected:
        raise ValueError(f"list every candidate number 1-{k} once, best first, e.g. {example!r}")
    return [int(p) - 1 for p in parts]


@dataclass
class Terminal:
    """Where questions go and answers come from (stdin/stdout, or any text streams)."""

    inp: TextIO
    out: TextIO

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def ask(self, question: str, parse: Callable[[str], Any]) -> Any:
        """Ask until ``parse`` accepts the answer; SKIP for ``s``; raises Quit for ``q`` or
        the end of input."""
        while True:
            self.out.write(f"{question} (s skip, q quit)> ")
            self.out.flush()
            line = self.inp.readline()
            if not line:
                self.say()
                raise Quit
            answer = line.strip()
            if not self.inp.isatty():
                self.say(answer)  # piped answers: keep the transcript readable
            if answer.lower() in ("q", "quit", "exit"):
                raise Quit
            if answer.lower() in ("s", "skip"):
                return SKIP
            try:
                return parse(answer)
            except ValueError as err:
                self.say(f"  not understood: {answer!r}: {err}" if answer else f"  {err}")


# ---------------------------------------------------------------------------- the loop


@dataclass
class Generator:
    """Makes a prompt's K candidates with a model, loaded on first use (a resumed session
    whose candidates all exist never loads it)."""

    spec: str
    k: int
    params: dict
    _loaded: tuple | None = field(default=None, repr=False)

    def __call__(self, prompt: Prompt) -> tuple[list[str], dict]:
        from tuneforge.generation import generate_batch

        if self._loaded is None:
            from tuneforge.models.runs import load_for_inference

            self._loaded = load_for_inference(self.spec)[:2]
        model, tokenizer = self._loaded
        # One seed per prompt: after a crash the same prompt gets the same candidates back.
        params = self.params | {"seed": self.params.get("seed", 0) + prompt.position}
        results = generate_batch(model, tokenizer, [prompt.messages] * self.k, **params)
        return [r.text for r in results], params


def collect(
    store: FeedbackStore,
    session: Session,
    annotator: str,
    generate: Callable[[Prompt], tuple[list[str], dict]],
    terminal: Terminal,
) -> int:
    """Ask ``annotator`` about every unfinished prompt of ``session``; returns answers given."""
    answered = 0
    try:
        while (prompt := store.next_prompt(session, annotator)) is not None:
            candidates = store.candidates(prompt.id)
            if not candidates:
                terminal.say(f"generating {session.k} candidates ...")
                texts, params = generate(prompt)
                candidates = store.add_candidates(
                    prompt.id, texts, model=session.model, params=params
                )
            done, total = store.progress(session, annotator)
            _show_prompt(terminal, prompt, done, total)
            answered += _JUDGES[session.mode](store, prompt, candidates, annotator, terminal)
    except (Quit, KeyboardInterrupt):  # every answer given is already committed
        pass
    done, total = store.progress(session, annotator)
    terminal.say(
        f"saved: {answered} answers this time; {done}/{total} prompts finished by {annotator} "
        f"in session {session.name!r}"
    )
    if done < total:
        terminal.say("run the same command again to continue where you stopped")
    return answered


def _show_prompt(terminal: Terminal, prompt: Prompt, done: int, total: int) -> None:
    terminal.say(_RULE)
    terminal.say(f"prompt {prompt.position + 1} ({done}/{total} finished)")
    for message in prompt.messages:
        terminal.say(f"[{message['role']}] {message['content']}")


def _show_candidate(terminal: Terminal, label: str, candidate: Candidate) -> None:
    terminal.say(f"--- {label} ---")
    terminal.say(_printable(candidate.text) if candidate.text.strip() else "(empty reply)")


def _printable(text: str) -> str:
    """Control characters a model emitted, shown as escapes: raw, they could move the cursor
    or clear the screen the annotator is reading."""
    return "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode()
        for ch in text
    )


def _rate(store, prompt, candidates, annotator, terminal) -> int:
    answered = 0
    unrated = store.unrated(prompt.id, annotator)
    for candidate in unrated:
        shown = now()
        position = f"{candidate.position + 1} of {len(candidates)}"
        _show_candidate(terminal, f"candidate {position}", candidate)
        low, high = RATING_SCALE
        rating = terminal.ask(f"rating {low}-{high}", parse_rating)
        if rating is SKIP:
            store.skip(prompt.id, annotator, shown_at=shown)
            return answered
        store.rate(candidate.id, rating, annotator, shown_at=shown)
        answered += 1
    return answered


def _choose(store, prompt, candidates, annotator, terminal) -> int:
    shown = now()
    for letter, candidate in zip(_LETTERS, candidates):
        _show_candidate(terminal, letter, candidate)
    letters = "|".join(_LETTERS[: len(candidates)])
    index = terminal.ask(f"best: {letters}", lambda text: parse_choice(text, len(candidates)))
    if index is SKIP:
        store.skip(prompt.id, annotator, shown_at=shown)
        return 0
    store.choose(prompt.id, candidates[index].id, annotator, shown_at=shown)
    return 1


def _rank(store, prompt, candidates, annotator, terminal) -> int:
    shown = now()
    for number, candidate in enumerate(candidates, start=1):
        _show_candidate(terminal, str(number), candidate)
    k = len(candidates)
    order = terminal.ask(
        f"rank best first, e.g. {' '.join(str(n) for n in range(k, 0, -1))}",
        lambda text: parse_ranking(text, k),
    )
    if order is SKIP:
        store.skip(prompt.id, annotator, shown_at=shown)
        return 0
    store.rank(prompt.id, [candidates[i].id for i in order], annotator, shown_at=shown)
    return 1


_JUDGES = {"rate": _rate, "choose": _choose, "rank": _rank}


# ------------------------------------------------------------------------------ commands


def register(subparsers: Any) -> None:
    """Add ``feedback collect | export | stats`` to the main CLI's subparsers."""
    feedback = subparsers.add_parser("feedback", help="collect human feedback on generations")
    commands = feedback.add_subparsers(dest="feedback_command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "collect",
        help="generate K candidates per prompt and rate, choose or rank them in the terminal",
        description="Generate K candidates per prompt and judge them, reading answers from "
        "stdin: rate (1-5 per candidate), choose (a letter) or rank (e.g. '2 1 3'). s skips a "
        "prompt, q stops; every answer is saved at once, and the same command resumes.",
    )
    p.add_argument("model", help="a run folder, builtin:NAME, tiny:ARCH, a folder or .gguf")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompts (.jsonl/.csv/.parquet): prompt text or messages per record",
    )
    p.add_argument("--db", required=True, help="SQLite database (created if missing)")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument(
        "-k", type=int, default=None, help="candidates per prompt (default: 2, or 3 for rank)"
    )
    p.add_argument("--annotator", default=None, help="your name (default: $USER)")
    p.add_argument(
        "--session", default=None, help="session name (default: the prompts file's name)"
    )
    p.add_argument("--system", help="system message for prompts that have none")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.set_defaults(func=collect_command)

    p = commands.add_parser("export", help="write judgements as training data (JSONL)")
    p.add_argument("--db", required=True)
    p.add_argument(
        "--to",
        choices=EXPORT_TARGETS,
        required=True,
        help="pairs (preference), ranking, rating or unpaired (KTO thumbs up/down)",
    )
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--session", help="only this session")
    p.add_argument("--annotator", help="only this annotator")
    p.add_argument("--good-min", type=int, default=4, help="unpaired: ratings >= this are good")
    p.add_argument("--bad-max", type=int, default=2, help="unpaired: ratings <= this are bad")
    p.set_defaults(func=export_command)

    p = commands.add_parser("stats", help="sessions, prompts, answers and progress per annotator")
    p.add_argument("--db", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=stats_command)


def collect_command(args: argparse.Namespace) -> int:
    from tuneforge.data.formats import load_prompts

    k = args.k if args.k is not None else DEFAULT_K[args.mode]
    _check_sampling(args, k)
    annotator = args.annotator or os.environ.get("USER") or "annotator"
    prompts = [_prompt_row(ex, args.system) for ex in load_prompts(args.prompts)]
    session_name = args.session or os.path.splitext(os.path.basename(args.prompts))[0]
    with FeedbackStore(args.db) as store:
        session = store.start_session(session_name, args.mode, args.model, k)
        added = store.add_prompts(session, prompts)
        total = store.progress(session, annotator)[1]
        print(
            f"session {session.name!r} ({session.mode}, k={k}, {args.model}): {total} prompts"
            f"{f', {added} new' if added and added != total else ''}; annotator {annotator}",
            flush=True,
        )
        params = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "precision": args.precision,
        }
        generate = Generator(args.model, k, params)
        collect(store, session, annotator, generate, Terminal(sys.stdin, sys.stdout))
    return 0


def _check_sampling(args: argparse.Namespace, k: int) -> None:
    problems = []  # too few candidates for the mode is the store's check
    if k > len(_LETTERS):
        problems.append(f"-k {k}: at most {len(_LETTERS)} candidates per prompt")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        problems.append("--max-new-tokens must be >= 1, --temperature >= 0, 0 < --top-p <= 1")
    if args.temperature == 0 and k > 1:
        problems.append(
            f"--temperature 0 is greedy: all {k} candidates would be the same; "
            "use a temperature above 0"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _prompt_row(example, system: str | None) -> tuple[list[dict], dict, str]:
    messages = [{"role": m.role, "content": m.content} for m in example.prompt_messages]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages, example.extra, example.where


def export_command(args: argparse.Namespace) -> int:
    with FeedbackStore(args.db, create=False) as store:
        result = export_feedback(
            store,
            args.to,
            args.out,
            session=args.session,
            annotator=args.annotator,
            good_min=args.good_min,
            bad_max=args.bad_max,
        )
    sources = ", ".join(f"{n} from {kind}s" for kind, n in sorted(result.sources.items()))
    print(f"wrote {result.records} {DATA_FORMAT[args.to]} records to {result.path} ({sources})")
    for why, n in result.dropped.items():
        print(f"  left out {n} {why}")
    return 0


def stats_command(args: argparse.Namespace) -> int:
    with FeedbackStore(args.db, create=False) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    if not stats:
        print(f"{args.db}: no sessions yet")
    for s in stats:
        print(
            f"session {s['session']!r}: mode {s['mode']}, model {s['model']}, k={s['k']}, "
            f"{s['prompts']} prompts, {s['candidates']} candidates"
        )
        for name, counts in s["annotators"].items():
            answers = ", ".join(
                f"{n} {kind}" for kind, n in counts.items() if kind != "finished_prompts"
            )
            print(
                f"  {name}: {counts['finished_prompts']}/{s['prompts']} prompts finished "
                f"({answers})"
            )
    return 0
