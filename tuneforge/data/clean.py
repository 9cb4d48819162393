"""``tuneforge data clean``: write a cleaned copy of a data file, and say why each record went.

Records are read as ``data check`` reads them (same formats, same line numbers), then pass
through steps in this order, each switchable:

1. **invalid**: records ``data check`` rejects are dropped, with its message as the reason.
2. **pii**: emails, phone numbers, cards, IBANs, IP addresses and secrets
   (:mod:`tuneforge.data.pii`) in the text fields are masked as ``[EMAIL]`` and the like, or the
   record is dropped. First, so the later steps see what training will see, and two records
   that differ only in an email address become duplicates.
3. **duplicate**: the same example again (:func:`~tuneforge.data.validate.example_key`:
   case and whitespace ignored); the first is kept.
4. **near_duplicate**: exact word-shingle Jaccard at least the threshold with an earlier
   *kept* record (:mod:`tuneforge.data.near_duplicates`: MinHash LSH finds the candidates).
   Comparing only with kept records means a chain a~b~c where a and c differ keeps c. System
   messages are left out of the comparison (and of language detection): a system prompt
   shared by the whole data set would make every pair look alike.
5. **language**: records detected as none of the wanted languages. Detection uses lingua over
   all its 75 languages in low-accuracy mode. Measured: restricting it to the wanted languages
   forces every text into one of them (a German text comes out "English" from an en/fr
   detector), so it cannot reject anything; all languages in high-accuracy mode took ~900 MB
   and ~25 ms a text, low-accuracy mode ~110 MB and ~1 ms, and agreed on sentences of 30+
   characters. Shorter texts are kept: a few words do not tell a language apart.
6. **too_short / too_long**: token counts of the longest sequence training sees (the chat
   template applied; for preference data the prompt with each response), from
   :mod:`tuneforge.data.render`; the concatenated text when the template cannot render it.

Only the text a model is trained on is touched (prompts, completions, message contents,
responses), never labels, roles, weights, scores or the record's other keys; records are written
back in their own structure. ``IN`` is never modified: ``OUT``, the removal log and the summary
are each written to a temporary file and moved into place.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneforge.data.example import Example, Message
from tuneforge.data.formats import FORMATS, Problem, parse_examples, read_records
from tuneforge.data.near_duplicates import DEFAULT_THRESHOLD, similar_pairs
from tuneforge.data.pii import mask_pii
from tuneforge.data.report import add_report_options, report_of_output
from tuneforge.data.validate import example_key
from tuneforge.errors import DataError, TuneforgeError

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
LANGUAGE_MIN_CHARS = 30
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
REASONS = ("invalid", "pii", "duplicate", "near_duplicate", "language", "too_short", "too_long")

# The keys of each format that hold trained text: a string, messages (their "content"), a list
# of either, or OpenAI's {"messages": [...]}. Everything else in a record is left as written.
TEXT_KEYS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "classification": ("text",),
    "preference": (
        "prompt", "chosen", "rejected", "input", "preferred_output", "non_preferred_output"
    ),
    "ranking": ("prompt", "responses"),
    "rating": ("prompt", "response"),
    "unpaired": ("prompt", "completion"),
    "prompt": ("prompt", "messages"),
}


@dataclass
class CleanSummary:
    """What :func:`clean_file` did: counts per removal reason and PII spans per kind."""

    input: str
    output: str
    removed_log: str
    summary_path: str
    records_in: int = 0
    records_out: int = 0
    removed: Counter = field(default_factory=Counter)  # reason -> records
    masked: int = 0  # records kept with PII masked
    pii: Counter = field(default_factory=Counter)  # kind -> spans found in valid records
    steps: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "removed_log": self.removed_log,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "removed": {r: self.removed[r] for r in REASONS if self.removed[r]},
            "masked": self.masked,
            "pii": dict(sorted(self.pii.items())),
            "steps": self.steps,
        }

    def render(self) -> str:
        removed = sum(self.removed.values())
        lines = [
            f"{self.input} -> {self.output}",
            f"  records in: {self.records_in}, out: {self.records_out}, removed: {removed}",
        ]
        lines += [f"    {reason}: {self.removed[reason]}" for reason in REASONS
                  if self.removed[reason]]
        if self.pii:
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.pii.items()))
            lines.append(f"  PII found: {kinds}; records kept with PII masked: {self.masked}")
        return "\n".join(lines)


@dataclass
class _Item:
    """One record on its way through the steps."""

    line: int
    record: dict | None  # as read (None: unreadable)
    example: Example | None  # as parsed, PII masked once that step ran
    cleaned: dict | None = None  # the record with PII masked, when any was found
    pii: Counter = field(default_factory=Counter)
    removal: dict[str, Any] | None = None  # {"reason": ..., and details}

    @property
    def kept(self) -> bool:
        return self.removal is None


def clean_file(
    path: str | Path,
    output: str | Path,
    *,
    removed_log: str | Path | None = None,
    fmt: str | None = None,
    dedup: bool = True,
    near_dups: bool = True,
    near_dup_threshold: float = DEFAULT_THRESHOLD,
    pii: str = "mask",
    languages: Sequence[str] | None = None,
    language_min_chars: int = LANGUAGE_MIN_CHARS,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    model: str = DEFAULT_MODEL,
    tokenizer: Any = None,
) -> CleanSummary:
    """Clean ``path`` into ``output``; returns what was done. Raises DataError on bad options,
    an unreadable input, or when nothing is left (then nothing at all is written).

    ``pii`` is ``"mask"``, ``"drop"`` or ``"off"``. ``languages`` are ISO 639-1 codes.
    ``tokenizer`` (or else ``model``'s) counts tokens when ``min_tokens``/``max_tokens`` is set.
    Writes ``output``, the removal log (default ``removed.jsonl`` next to ``output``) and
    ``<output stem>.summary.json``.
    """
    path, output = Path(path), Path(output)
    log_path = Path(removed_log) if removed_log else output.with_name("removed.jsonl")
    summary_path = output.with_name(output.stem + ".summary.json")
    _check_paths(path, output, log_path, summary_path)
    _check_options(pii, near_dup_threshold, min_tokens, max_tokens, language_min_chars)
    detector = _language_detector(languages) if languages else None
    counting = min_tokens is not None or max_tokens is not None
    if counting and tokenizer is None:
        from tuneforge.models.loading import load_tokenizer

        tokenizer = load_tokenizer(model)
    items = _read(path, fmt)
    if pii != "off":
        _pii_step(items, drop=pii == "drop")
    if dedup:
        _exact_duplicates(items)
    if near_dups:
        _near_duplicates(items, near_dup_threshold)
    if detector is not None:
        wanted = {code.strip().lower() for code in languages}
        _language_step(items, detector, wanted, language_min_chars)
    if counting:
        _length_step(items, tokenizer, min_tokens, max_tokens)

    summary = _summarise(items, CleanSummary(str(path), str(output), str(log_path),
                                             str(summary_path)))
    summary.steps = {
        "pii": pii,
        "dedup": dedup,
        "near_dups": near_dup_threshold if near_dups else None,
        "languages": list(languages or []) or None,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "model": model if counting else None,
    }
    kept = [item for item in items if item.kept]
    if not kept:
        raise DataError(
            f"{path}: no records left after cleaning, so nothing was written "
            f"({_reason_counts(summary)}); loosen the filters or fix the data"
        )
    _write_records(output, [item.cleaned or item.record for item in kept])
    log = [_log_entry(path, item) for item in items if not item.kept or item.cleaned]
    _write_atomic(log_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in log))
    _write_atomic(summary_path, json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _summarise(items: list[_Item], summary: CleanSummary) -> CleanSummary:
    summary.records_in = len(items)
    summary.records_out = sum(1 for item in items if item.kept)
    summary.removed = Counter(
        item.removal["reason"].split(":")[0] for item in items if not item.kept
    )
    summary.masked = sum(1 for item in items if item.kept and item.cleaned is not None)
    for item in items:
        summary.pii.update(item.pii)
    return summary


def _reason_counts(summary: CleanSummary) -> str:
    parts = [f"{reason} {summary.removed[reason]}" for reason in REASONS
             if summary.removed[reason]]
    return f"{summary.records_in} in, removed: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Checks before any work


def _check_paths(path: Path, output: Path, log_path: Path, summary_path: Path) -> None:
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(
            f"{output}: cannot write {output.suffix or 'a file without extension'!r}; "
            f"name the output {', '.join('*' + s for s in OUTPUT_SUFFIXES)}"
        )
    if log_path.suffix.lower() != ".jsonl":
        raise DataError(f"{log_path}: the removal log is JSONL; name it *.jsonl")
    outputs = {"output": output, "removal log": log_path, "summary": summary_path}
    for name, target in outputs.items():
        if _same_file(path, target):
            raise DataError(f"{target}: the {name} would overwrite the input; choose another path")
    if _same_file(output, log_path):
        raise DataError(f"{log_path}: the removal log and the output must be different files")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_options(pii: str, threshold: float, min_tokens: int | None,
                   max_tokens: int | None, language_min_chars: int) -> None:
    problems = []
    if pii not in ("mask", "drop", "off"):
        problems.append(f"pii must be 'mask', 'drop' or 'off', got {pii!r}")
    if not 0.0 < threshold <= 1.0:
        problems.append(f"--near-dup-threshold must be in (0, 1], got {threshold}")
    for name, value in (("--min-tokens", min_tokens), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        problems.append(f"--min-tokens {min_tokens} is above --max-tokens {max_tokens}")
    if language_min_chars < 0:
        problems.append(f"--language-min-chars must be 0 or more, got {language_min_chars}")
    if problems:
        raise DataError("; ".join(problems))


def _language_detector(codes: Sequence[str]) -> Callable[[list[str]], list[str | None]]:
    """A function texts -> the ISO 639-1 code of each one's language (None when unsure);
    unknown codes in ``codes`` are refused here, before any work."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    unknown = []
    for code in codes:
        try:
            IsoCode639_1.from_str(code.strip().lower())
        except ValueError:
            unknown.append(code)
    if unknown:
        raise DataError(
            f"--language: unknown language code(s) {', '.join(map(repr, unknown))}; "
            "use ISO 639-1 codes such as en, fr, de, es"
        )
    detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()

    def detect(texts: list[str]) -> list[str | None]:
        languages = detector.detect_languages_in_parallel_of(texts)
        return [None if lang is None else lang.iso_code_639_1.name.lower() for lang in languages]

    return detect


# --------------------------------------------------------------------------------------------
# Reading


def _read(path: Path, fmt: str | None) -> list[_Item]:
    """Every record of the file with its example, or the reason it is invalid."""
    try:
        rows = read_records(path)
        examples, problems = parse_examples(path, fmt)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from err
    whole_file = [p for p in problems if p.line is None and p.severity == "error"]
    if whole_file or not rows:
        raise DataError(f"{path}: {'; '.join(p.message for p in whole_file) or 'no records'}")
    by_line = {ex.line: ex for ex in examples}
    errors: dict[int, list[Problem]] = {}
    for problem in problems:
        if problem.severity == "error":
            errors.setdefault(problem.line, []).append(problem)
    items = []
    for line, record in rows:
        example = by_line.get(line)
        item = _Item(line, record if isinstance(record, dict) else None, example)
        if example is None:
            messages = "; ".join(
                ": ".join(part for part in (p.field, p.message) if part)
                for p in errors.get(line, [])
            ) or "not a valid record"
            item.removal = {"reason": f"invalid: {messages}"}
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------
# Steps


def _pii_step(items: list[_Item], *, drop: bool) -> None:
    for item in _kept(items):
        counts: Counter = Counter()
        cleaned = _mask_record(item.record, item.example.format, counts)
        if not counts:
            continue
        item.pii = counts
        if drop:
            item.removal = {"reason": "pii"}
        else:
            item.cleaned = cleaned
            item.example = _mask_example(item.example)


def mask_record(record: dict, fmt: str) -> tuple[dict, Counter]:
    """A copy of ``record`` (of format ``fmt``) with PII masked in its text fields, and the
    count of each kind masked. Labels, roles, weights and scores are left as they are."""
    counts: Counter = Counter()
    return _mask_record(record, fmt, counts), counts


def _mask_record(record: dict, fmt: str, counts: Counter) -> dict:
    cleaned = copy.deepcopy(record)
    for key in TEXT_KEYS[fmt]:
        if key in cleaned:
            cleaned[key] = _mask_value(cleaned[key], counts)
    return cleaned


def _mask_value(value: Any, counts: Counter) -> Any:
    if isinstance(value, str):
        masked, found = mask_pii(value)
        counts.update(found)
        return masked
    if isinstance(value, list):
        return [_mask_value(v, counts) for v in value]
    if isinstance(value, dict):
        for key in ("content", "messages"):  # a message, or OpenAI's {"messages": [...]}
            if isinstance(value.get(key), (str, list)):
                value[key] = _mask_value(value[key], counts)
    return value


def _mask_example(example: Example) -> Example:
    """The example with PII masked the way its record was (a classification's label, the
    last message, stays as it is)."""

    def masked(messages: list[Message] | None, keep_last: bool = False) -> list[Message] | None:
        if messages is None:
            return None
        out = [replace(m, content=mask_pii(m.content)[0]) for m in messages]
        return out[:-1] + messages[-1:] if keep_last else out

    return replace(
        example,
        prompt=None if example.prompt is None else mask_pii(example.prompt)[0],
        completion=None if example.completion is None else mask_pii(example.completion)[0],
        messages=masked(example.messages, keep_last=example.format == "classification"),
        prompt_messages=masked(example.prompt_messages),
        responses=None if example.responses is None else [masked(r) for r in example.responses],
    )


def _exact_duplicates(items: list[_Item]) -> None:
    first: dict[str, int] = {}
    for item in _kept(items):
        key = example_key(item.example)
        if key in first:
            item.removal = {"reason": "duplicate", "duplicate_of": first[key]}
        else:
            first[key] = item.line


def _near_duplicates(items: list[_Item], threshold: float) -> None:
    """Drop a record near an earlier kept one; pairs are visited in order, so "earlier kept"
    is already decided when a later record is judged."""
    kept = list(_kept(items))
    texts = ["\n".join(_texts(item.example, with_label=True)) for item in kept]
    matches: dict[int, list[tuple[int, float]]] = {}
    for i, j, score in similar_pairs(texts, threshold):
        matches.setdefault(j, []).append((i, score))
    for j, item in enumerate(kept):
        earlier = [(score, i) for i, score in matches.get(j, []) if kept[i].kept]
        if earlier:
            score, i = max(earlier)
            item.removal = {
                "reason": "near_duplicate",
                "duplicate_of": kept[i].line,
                "similarity": round(score, 4),
            }


def _language_step(items: list[_Item], detect: Callable[[list[str]], list[str | None]],
                   wanted: set[str], min_chars: int) -> None:
    judged = []
    for item in _kept(items):
        text = "\n".join(_texts(item.example, with_label=False))
        if len(text.strip()) >= min_chars:  # shorter: kept, too few words to tell
            judged.append((item, text))
    languages = detect([text for _, text in judged])
    for (item, _), language in zip(judged, languages, strict=True):
        if language is not None and language not in wanted:
            item.removal = {"reason": "language", "language": language}


def _length_step(items: list[_Item], tokenizer: Any, min_tokens: int | None,
                 max_tokens: int | None) -> None:
    for item in _kept(items):
        tokens = token_count(item.example, tokenizer)
        if min_tokens is not None and tokens < min_tokens:
            item.removal = {"reason": "too_short", "tokens": tokens}
        elif max_tokens is not None and tokens > max_tokens:
            item.removal = {"reason": "too_long", "tokens": tokens}


def token_count(example: Example, tokenizer: Any) -> int:
    """Tokens of the longest sequence training builds from ``example``: the whole example
    rendered as training renders it (chat template, EOS), or for preference, ranking, rating
    and unpaired data the prompt with each response; the concatenated text, with the
    tokenizer's special tokens, when the template cannot render it."""
    from tuneforge.data.render import render_response, render_sft

    try:
        if example.responses is not None:
            return max(len(render_response(example, i, tokenizer))
                       for i in range(len(example.responses)))
        return len(render_sft(example, tokenizer))
    except DataError:
        text = "\n".join(_texts(example, with_label=True, with_system=True))
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _kept(items: list[_Item]):
    return (item for item in items if item.kept)


def _texts(example: Example, *, with_label: bool, with_system: bool = False) -> list[str]:
    """The example's text: prompt, completion and every message, in order. System messages
    only when asked: one system prompt shared by a whole data set would make every pair of
    records look alike, and its language is not the records' own."""
    messages = list(example.messages or [])
    if example.format == "classification" and not with_label:
        messages = messages[:-1]
    conversations = [messages, example.prompt_messages or []] + list(example.responses or [])
    texts = [t for t in (example.prompt, example.completion) if t]
    return texts + [m.content for conversation in conversations for m in conversation
                    if with_system or m.role != "system"]


# --------------------------------------------------------------------------------------------
# Writing


def _log_entry(path: Path, item: _Item) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": str(path), "line": item.line}
    if item.kept:
        entry |= {"action": "masked", "reason": "pii"}
    else:
        entry |= {"action": "removed"} | item.removal
    if item.pii:
        entry["pii"] = dict(sorted(item.pii.items()))
    entry["record"] = item.record
    return entry


def _write_records(output: Path, records: list[dict]) -> None:
    suffix = output.suffix.lower()
    if suffix == ".jsonl":
        _write_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif suffix in (".csv", ".tsv"):
        _write_atomic(output, _csv_text(records, "," if suffix == ".csv" else "\t"))
    else:
        _write_parquet(output, records)


def _csv_text(records: list[dict], delimiter: str) -> str:
    """One row per record; nested values (messages, responses) as JSON in their cell, the
    way the CSV reader takes them back."""
    header: dict[str, None] = {}
    for record in records:
        header.update(dict.fromkeys(record))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    for record in records:
        writer.writerow([_cell(record.get(key)) for key in header])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _write_parquet(output: Path, records: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{output}: writing Parquet needs pyarrow: pip install pyarrow") from err
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(
            f"{output}: these records do not fit one Parquet schema ({err}); write .jsonl instead"
        ) from err
    _write_atomic(output, lambda tmp: pq.write_table(table, tmp))


def _write_atomic(path: Path, content: str | Callable[[str], None]) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``: a reader never
    sees half a file, and a failure leaves any earlier ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Command line


def register(commands: Any) -> None:
    """Add ``clean`` to the ``data`` command's subparsers."""
    parser = commands.add_parser(
        "clean",
        help="write a cleaned copy: duplicates, PII, language and length filters",
        description=(
            "Write a cleaned copy of a data file (IN is never modified): drop records data "
            "check rejects, mask PII, drop exact and near duplicates, and optionally filter "
            "by language and token length. Every removed or masked record is logged, with "
            "the original record (PII included: keep that log private)."
        ),
    )
    parser.add_argument("file", metavar="IN", help="data file (.jsonl, .csv, .tsv or .parquet)")
    parser.add_argument("--output", "-o", required=True, metavar="OUT",
                        help="cleaned file; its extension picks the format "
                             f"({', '.join(OUTPUT_SUFFIXES)})")
    parser.add_argument("--removed", metavar="PATH",
                        help="log of removed and masked records (default: removed.jsonl next "
                             "to OUT); the summary goes beside OUT as <OUT stem>.summary.json")
    parser.add_argument("--format", choices=FORMATS, help="data format (default: detect)")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false",
                        help="keep exact duplicates (case and whitespace ignored)")
    parser.add_argument("--no-near-dups", dest="near_dups", action="store_false",
                        help="keep near-duplicates")
    parser.add_argument("--near-dup-threshold", type=float, default=DEFAULT_THRESHOLD,
                        metavar="J", help="word 3-gram Jaccard similarity at which a record "
                        f"is a near-duplicate of an earlier one (default {DEFAULT_THRESHOLD})")
    pii = parser.add_mutually_exclusive_group()
    pii.add_argument("--drop-pii", dest="pii", action="store_const", const="drop",
                     help="drop records with PII instead of masking it")
    pii.add_argument("--keep-pii", dest="pii", action="store_const", const="off",
                     help="do not look for PII")
    parser.set_defaults(pii="mask")
    parser.add_argument("--language", metavar="CODES",
                        help="keep only records in these languages (ISO 639-1, e.g. en,fr); "
                             "texts shorter than --language-min-chars are kept, since a few "
                             "words do not tell a language apart")
    parser.add_argument("--language-min-chars", type=int, default=LANGUAGE_MIN_CHARS,
                        metavar="N", help="texts shorter than this are kept by --language "
                        f"(default {LANGUAGE_MIN_CHARS})")
    parser.add_argument("--min-tokens", type=int, metavar="N",
                        help="drop records shorter than N tokens")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="drop records longer than N tokens; counted as training sees "
                             "them: chat template applied, EOS included, for preference data "
                             "the prompt with its longest response (the concatenated text when "
                             "the model's template cannot render a record)")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                        help=f"tokenizer for the token counts (default {DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_report_options(parser)
    parser.set_defaults(func=clean_command)


def clean_command(args: argparse.Namespace) -> int:
    """Clean the file and print the summary; 0 on success, 2 on bad input or an empty result."""
    languages = [c.strip() for c in args.language.split(",") if c.strip()] if args.language else None
    try:
        summary = clean_file(
            args.file,
            args.output,
            removed_log=args.removed,
            fmt=args.format,
            dedup=args.dedup,
            near_dups=args.near_dups,
            near_dup_threshold=args.near_dup_threshold,
            pii=args.pii,
            languages=languages,
            language_min_chars=args.language_min_chars,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            model=args.model,
        )
    except TuneforgeError as err:  # bad data or options, or a model that cannot be loaded
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.render())
        print(f"wrote {summary.output}, {summary.removed_log}, {summary.summary_path}")
    try:
        report_of_output(summary.output, args)
    except TuneforgeError as err:  # the cleaned file is written; only its report failed
        print(f"error: quality report: {err}", file=sys.stderr)
        return 2
    return 0
