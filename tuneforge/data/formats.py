"""Reading data files and normalising every record into an :class:`Example`.

A file is JSONL (one object per line), CSV/TSV (one row per record, columns are keys, nested
values such as ``messages`` written as JSON in the cell) or Parquet (one row per record). Its
format is detected from the keys of its records, by majority, so one odd line is reported as
the odd one rather than making every other line wrong. All records of a file share one format.

Nothing here stops at the first problem: :func:`parse_examples` collects every problem as a
:class:`Problem` (``file:line: field: message``) so the user can fix a file in one pass, and
:func:`load_examples` raises one :class:`DataError` listing them all.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.example import Example, Message
from tuneforge.errors import DataError

FORMATS: tuple[str, ...] = (
    "prompt_completion",
    "chat",
    "alpaca",
    "classification",
    "preference",
    "ranking",
    "rating",
    "unpaired",
    "prompt",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
MAX_LISTED = 50

_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson", ".json")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = (".parquet", ".pq")

# CSV/Parquet cells holding these keys are JSON when they look like JSON. The first group is
# always structured; the second is usually plain text, so it is decoded only into messages.
_JSON_KEYS = frozenset(
    {"messages", "responses", "scores", "preferred_output", "non_preferred_output"}
)
_MAYBE_JSON_KEYS = frozenset({"prompt", "completion", "chosen", "rejected", "input", "response"})

_KEYS_HINT = (
    "prompt+completion, messages, instruction+output, text+label, prompt+chosen+rejected, "
    "input+preferred_output+non_preferred_output, prompt+responses, prompt+response+rating, "
    "or prompt+completion+label (true/false)"
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file; ``line`` is None for the whole file."""

    source: str
    line: int | None
    field: str
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        parts = [location(self.source, self.line), self.field, self.message]
        return ": ".join(part for part in parts if part)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecordError(DataError):
    """A record that could not be read at all (bad JSON, not an object, bad CSV cell)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DataFileError(DataError):
    """A whole file that cannot be read (missing, unknown extension, unreadable)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def location(source: str, line: int | None) -> str:
    """``file:line``; Parquet has rows, not lines, so there it is ``file:row N``."""
    if line is None:
        return source
    return f"{source}:row {line}" if is_parquet(source) else f"{source}:{line}"


def is_parquet(source: str | Path) -> bool:
    return Path(source).suffix.lower() in _PARQUET_SUFFIXES


def format_problems(problems: list[Problem], header: str, limit: int = MAX_LISTED) -> str:
    """``header`` then one problem a line, capped so a broken 1M-line file stays readable."""
    lines = [header] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Detection


def detect_format(record: dict) -> str | None:
    """The format a record's keys point to, or None when they fit none.

    One distinctive key is enough, so a record missing a required key is still recognised and
    reported as "missing key" instead of "unknown format".
    """
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if keys & {"chosen", "rejected", "preferred_output", "non_preferred_output"}:
        return "preference"
    if "responses" in keys:
        return "ranking"
    if "rating" in keys:
        return "rating"
    if "label" in keys and keys & {"prompt", "completion"} and "text" not in keys:
        return "unpaired"  # TRL's unpaired preference; text+label stays classification
    if keys & {"instruction", "output"}:
        return "alpaca"
    if "label" in keys:
        return "classification"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"  # a prompt alone: PPO/GRPO rollouts, feedback collection, synth
    return None


def _majority_format(records: list[tuple[int, dict]]) -> str | None:
    counts = Counter(f for f in (detect_format(r) for _, r in records) if f is not None)
    if len(counts) > 1:
        counts.pop("prompt", None)  # records missing their response, not a file of prompts
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------------------------
# Reading


def read_records(path: str | Path) -> list[tuple[int, dict | Exception]]:
    """``(line, record)`` pairs; a record that could not be read is the exception instead.

    Lines are 1-based physical lines (JSONL: blank lines skipped; CSV: the line a row starts
    on); Parquet gives the row index + 1. Raises DataFileError if the file can't be read at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "file not found")
    if path.is_dir():
        raise DataFileError(path, "is a directory, expected a data file")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in _CSV_DELIMITERS:
        return _read_csv(path, _CSV_DELIMITERS[suffix])
    if suffix in _PARQUET_SUFFIXES:
        return _read_parquet(path)
    known = ", ".join(_JSONL_SUFFIXES + tuple(_CSV_DELIMITERS) + _PARQUET_SUFFIXES)
    raise DataFileError(path, f"unknown file type {suffix or '(no extension)'!r}; use {known}")


def _read_jsonl(path: Path) -> list[tuple[int, dict | Exception]]:
    # Split bytes on "\n" only: str.splitlines would also split on U+2028 inside strings.
    out: list[tuple[int, dict | Exception]] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            out.append((number, RecordError("json", f"not valid UTF-8 (byte {err.start + 1})")))
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            out.append((number, err))
            continue
        if not isinstance(value, dict):
            message = f"expected a JSON object, got {type_name(value)}"
            out.append((number, RecordError("record", message)))
            continue
        out.append((number, value))
    return out


def _read_csv(path: Path, delimiter: str) -> list[tuple[int, dict | Exception]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFileError(path, f"not valid UTF-8 (byte {err.start + 1})") from err
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    out: list[tuple[int, dict | Exception]] = []
    previous = 0  # reader.line_num after the previous row: the next row starts one later
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:  # the reader cannot resync after this; stop here
            out.append((previous + 1, RecordError("record", f"bad CSV: {err}")))
            break
        start, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [name.strip() for name in row]
        elif len(row) > len(header):
            message = f"row has {len(row)} cells but the header has {len(header)}"
            out.append((start, RecordError("record", message)))
        else:
            out.append((start, _decode_row(dict(zip(header, row, strict=False)))))
    return out


def _read_parquet(path: Path) -> list[tuple[int, dict | Exception]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataFileError(path, "reading Parquet needs pyarrow: pip install pyarrow") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataFileError(path, f"cannot read Parquet: {err}") from err
    # Parquet has one schema per file, so a key absent from a record comes back as None.
    cleaned = ({k: v for k, v in row.items() if v is not None} for row in rows)
    return [(i, _decode_row(row)) for i, row in enumerate(cleaned, start=1)]


def _decode_row(row: dict[str, Any]) -> dict | Exception:
    """Decode JSON written into cells (``messages`` and other nested values)."""
    decoded: dict[str, Any] = {}
    for key, value in row.items():
        if not isinstance(value, str):
            decoded[key] = value
        elif key in _JSON_KEYS:
            if not value.strip():
                continue  # an empty optional cell (say, scores) means "absent"
            if not value.lstrip().startswith(("[", "{")):
                decoded[key] = value
                continue
            try:
                decoded[key] = json.loads(value)
            except json.JSONDecodeError as err:
                return RecordError(key, f"invalid JSON in the cell: {err.msg} (column {err.colno})")
        elif key in _MAYBE_JSON_KEYS and value.lstrip().startswith(("[", "{")):
            decoded[key] = _messages_or_text(value)
        else:
            decoded[key] = value
    return decoded


def _messages_or_text(value: str) -> Any:
    """A cell that decodes into messages is messages; anything else stays the text it is."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
        return parsed
    if isinstance(parsed, dict) and "messages" in parsed:
        return parsed
    return value


# --------------------------------------------------------------------------------------------
# Parsing


def parse_examples(path: str | Path, fmt: str | None = None) -> tuple[list[Example], list[Problem]]:
    """Every valid example of a file, and every problem found (never raises for bad data).

    Raises DataError only when the file itself cannot be read or ``fmt`` is not a known name.
    """
    _check_format_name(fmt)
    path = Path(path)
    source = str(path)
    rows = read_records(path)
    problems: list[Problem] = []
    records: list[tuple[int, dict]] = []
    for line, record in rows:
        if isinstance(record, Exception):
            problems.append(_read_problem(source, line, record))
        else:
            records.append((line, record))
    if not rows:
        problems.append(Problem(source, None, "", "no records: the file is empty"))
    file_format = fmt or _majority_format(records)
    examples = []
    for line, record in records:
        ctx = _Context(source, line, problems)
        example = _normalise(record, file_format, fmt is not None, ctx)
        if example is not None:
            examples.append(example)
    problems.sort(key=lambda p: (p.line is not None, p.line or 0))
    return examples, problems


def load_examples(path: str | Path, fmt: str | None = None) -> list[Example]:
    """Every example of a file; raises one DataError listing every error if there are any."""
    examples, problems = parse_examples(path, fmt)
    _raise_errors(path, problems)
    return examples


def _raise_errors(path: str | Path, problems: list[Problem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        noun = "problem" if len(errors) == 1 else "problems"
        raise DataError(format_problems(errors, f"{path}: {len(errors)} {noun} in the data:"))


def load_prompts(path: str | Path) -> list[Example]:
    """Prompts alone, for generating from (feedback collection, PPO/GRPO rollouts).

    Each record gives ``prompt`` (text, or messages ending with a user turn) or ``messages``
    (its turns up to the last user turn are the prompt, so a chat data set works as is). The
    record's other keys stay in ``extra``: the columns a reward function reads, such as the
    ``answer`` of an arithmetic problem. Examples have ``format == "prompt"`` and only
    ``prompt_messages``. Raises one DataError listing every problem.
    """
    examples, problems = parse_examples(path, "prompt")
    _raise_errors(path, problems)
    return examples


def _prompt_only(record: dict, ctx: _Context) -> Example | None:
    if "prompt" in record or "messages" not in record:
        prompt = _prompt(record, "prompt", ctx)
        return ctx.example("prompt", record, {"prompt"}, prompt_messages=prompt) if prompt else None
    messages = _messages_key(record, "messages", ctx)
    if messages is None:
        return None
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        ctx.error("messages", "no user message to answer")
        return None
    prompt = messages[: users[-1] + 1]
    if not _check_roles(prompt, _fields("messages", prompt), ctx, last="user"):
        return None
    return ctx.example("prompt", record, {"messages"}, prompt_messages=prompt)


def _check_format_name(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of: {', '.join(FORMATS)}")


def _read_problem(source: str, line: int, err: Exception) -> Problem:
    if isinstance(err, json.JSONDecodeError):
        return Problem(source, line, "json", f"invalid JSON: {err.msg} (column {err.colno})")
    return Problem(source, line, getattr(err, "field", "record"), str(err))


@dataclass
class _Context:
    """Where the record being normalised lives; collects its problems."""

    source: str
    line: int
    problems: list[Problem]
    errors: int = 0

    @property
    def failed(self) -> bool:
        return self.errors > 0

    def error(self, field: str, message: str) -> None:
        self.errors += 1
        self.problems.append(Problem(self.source, self.line, field, message))

    def warn(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.source, self.line, field, message, "warning"))

    def example(self, fmt: str, record: dict, known: set[str], **fields: Any) -> Example:
        extra = {k: v for k, v in record.items() if k not in known}
        return Example(source=self.source, line=self.line, format=fmt, extra=extra, **fields)


def _normalise(
    record: dict, file_format: str | None, explicit: bool, ctx: _Context
) -> Example | None:
    detected = detect_format(record)
    keys = ", ".join(sorted(record)) or "none"
    if file_format is None:
        ctx.error("record", f"cannot tell the format from its keys ({keys}); expected {_KEYS_HINT}")
        return None
    # a lone prompt is a weak sign: in a file of another format it is that record's missing key;
    # and a file of prompts takes a chat's turns up to its last user message as a prompt
    if detected not in (None, file_format, "prompt") and file_format != "prompt":
        why = "the format asked for is" if explicit else "the rest of the file is"
        ctx.error(
            "record",
            f"keys ({keys}) look like format {detected!r}, but {why} {file_format!r} "
            "(all records of a file must share one format)",
        )
        return None
    example = _NORMALISERS[file_format](record, ctx)
    return None if ctx.failed else example


def type_name(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Field checks


def _text(
    record: dict, key: str, ctx: _Context, *, allow_empty: bool = False, field: str | None = None
) -> str | None:
    """A required string, returned exactly as written (no stripping: separators matter)."""
    field = field or key
    if key not in record:
        ctx.error(field, "missing required key")
        return None
    value = record[key]
    if not isinstance(value, str):
        ctx.error(field, f"expected a string, got {type_name(value)}")
        return None
    if not allow_empty and not value.strip():
        ctx.error(field, "empty content")
        return None
    return value


def _message(item: Any, field: str, ctx: _Context) -> Message | None:
    """One chat message: a known role, non-empty string content, weight 0/1 on assistants."""
    if not isinstance(item, dict):
        ctx.error(field, f"expected a message object with role and content, got {type_name(item)}")
        return None
    before = ctx.errors
    role = item.get("role")
    if role is None:
        ctx.error(f"{field}.role", "missing required key")
    elif not isinstance(role, str):
        ctx.error(f"{field}.role", f"expected a string, got {type_name(role)}")
    elif role not in ROLES:
        ctx.error(f"{field}.role", f"unknown role {role!r}; use system, user or assistant")
    content = _text(item, "content", ctx, field=f"{field}.content")
    weight = item.get("weight")
    if weight is not None:
        if role != "assistant":
            ctx.error(f"{field}.weight", "weight is only allowed on assistant messages")
        elif (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1)
        ):
            ctx.error(f"{field}.weight", f"weight must be 0 or 1, got {json.dumps(weight)}")
    if ctx.errors > before:
        return None
    return Message(role=role, content=content, weight=None if weight is None else float(weight))


def _fields(prefix: str, items: list[Any]) -> list[str]:
    return [f"{prefix}[{i}]" for i in range(len(items))]


def _message_list(value: Any, field: str, ctx: _Context) -> list[Message] | None:
    if not isinstance(value, list):
        ctx.error(field, f"expected an array of messages, got {type_name(value)}")
        return None
    if not value:
        ctx.error(field, "empty array of messages")
        return None
    before = ctx.errors
    messages = [_message(item, f"{field}[{i}]", ctx) for i, item in enumerate(value)]
    return None if ctx.errors > before else messages  # type: ignore[return-value]


def _required(record: dict, key: str, ctx: _Context) -> bool:
    if key not in record:
        ctx.error(key, "missing required key")
        return False
    return True


def _check_roles(messages: list[Message], fields: list[str], ctx: _Context, *, last: str) -> bool:
    """An optional first system message, then user/assistant alternating, ending with ``last``.

    Only the first misplaced role is reported: after one, every later turn is off by one too.
    """
    start = 1 if messages[0].role == "system" else 0
    for i in range(start, len(messages)):
        role = messages[i].role
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role == expected:
            continue
        if role == "system":
            message = "a system message is only allowed first"
        else:
            message = (
                f"expected role {expected!r} here, got {role!r} (after an optional first "
                "system message, roles alternate user, assistant, user, ...)"
            )
        ctx.error(f"{fields[i]}.role", message)
        return False
    if messages[-1].role != last:
        got = messages[-1].role
        ctx.error(f"{fields[-1]}.role", f"the last message must be from the {last}, got {got!r}")
        return False
    return True


def _prompt(record: dict, key: str, ctx: _Context) -> list[Message] | None:
    """A prompt: plain text (one user message) or messages ending with a user turn."""
    if not _required(record, key, ctx):
        return None
    value = record[key]
    if isinstance(value, str):
        if value.strip():
            return [Message(role="user", content=value)]
        ctx.error(key, "empty content")
        return None
    if not isinstance(value, list):
        ctx.error(key, f"expected a string or an array of messages, got {type_name(value)}")
        return None
    messages = _message_list(value, key, ctx)
    if messages is None or not _check_roles(messages, _fields(key, messages), ctx, last="user"):
        return None
    return messages


def _response(value: Any, field: str, ctx: _Context) -> list[Message] | None:
    """A response: plain text (one assistant message) or a list of assistant messages."""
    if isinstance(value, str):
        if value.strip():
            return [Message(role="assistant", content=value)]
        ctx.error(field, "empty content")
        return None
    if not isinstance(value, list):
        message = f"expected a string or an array of assistant messages, got {type_name(value)}"
        ctx.error(field, message)
        return None
    messages = _message_list(value, field, ctx)
    if messages is None or not _assistant_only(messages, _fields(field, messages), field, ctx):
        return None
    return messages


def _assistant_only(messages: list[Message], fields: list[str], field: str, ctx: _Context) -> bool:
    if not messages:
        ctx.error(field, "no response after the prompt")
        return False
    for message, name in zip(messages, fields, strict=True):
        if message.role != "assistant":
            ctx.error(f"{name}.role", f"a response holds assistant messages, got {message.role!r}")
            return False
    return True


def _messages_key(record: dict, key: str, ctx: _Context) -> list[Message] | None:
    return _message_list(record[key], key, ctx) if _required(record, key, ctx) else None


def _response_key(record: dict, key: str, ctx: _Context) -> list[Message] | None:
    return _response(record[key], key, ctx) if _required(record, key, ctx) else None


# --------------------------------------------------------------------------------------------
# One normaliser per format


def _prompt_completion(record: dict, ctx: _Context) -> Example | None:
    """Raw text, kept byte-exact; or TRL's conversational style (lists of messages)."""
    if isinstance(record.get("prompt"), list) or isinstance(record.get("completion"), list):
        return _conversational_prompt_completion(record, ctx)
    prompt = _text(record, "prompt", ctx, allow_empty=True)
    completion = _text(record, "completion", ctx)
    if ctx.failed:
        return None
    known = {"prompt", "completion"}
    return ctx.example("prompt_completion", record, known, prompt=prompt, completion=completion)


def _conversational_prompt_completion(record: dict, ctx: _Context) -> Example | None:
    """Only the completion is trained (as in TRL), so assistant turns of the prompt get weight 0."""
    prompt = _messages_key(record, "prompt", ctx)
    completion = _messages_key(record, "completion", ctx)
    if prompt is None or completion is None:
        return None
    fields = _fields("prompt", prompt) + _fields("completion", completion)
    if not _check_roles(prompt + completion, fields, ctx, last="assistant"):
        return None
    prompt = [Message(m.role, m.content, 0.0) if m.role == "assistant" else m for m in prompt]
    _warn_untrained(completion, "completion", ctx)
    known = {"prompt", "completion"}
    return ctx.example("prompt_completion", record, known, messages=prompt + completion)


def _chat(record: dict, ctx: _Context) -> Example | None:
    messages = _messages_key(record, "messages", ctx)
    if messages is None:
        return None
    if not _check_roles(messages, _fields("messages", messages), ctx, last="assistant"):
        return None
    _warn_untrained(messages, "messages", ctx)
    return ctx.example("chat", record, {"messages"}, messages=messages)


def _warn_untrained(messages: list[Message], field: str, ctx: _Context) -> None:
    if all(m.weight == 0 for m in messages if m.role == "assistant"):
        ctx.warn(field, "every assistant message has weight 0: nothing to train on")


def _alpaca(record: dict, ctx: _Context) -> Example | None:
    """instruction (+ blank line + input, when there is one) is the user turn; output answers."""
    instruction = _text(record, "instruction", ctx)
    extra_input = record.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        ctx.error("input", f"expected a string, got {type_name(extra_input)}")
    output = _text(record, "output", ctx)
    if ctx.failed:
        return None
    user = instruction + (f"\n\n{extra_input}" if extra_input and extra_input.strip() else "")
    messages = [Message(role="user", content=user), Message(role="assistant", content=output)]
    return ctx.example("alpaca", record, {"instruction", "input", "output"}, messages=messages)


def _classification(record: dict, ctx: _Context) -> Example | None:
    text = _text(record, "text", ctx)
    label = record.get("label")
    if not _required(record, "label", ctx):
        pass
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        ctx.error("label", f"expected a string or an integer, got {type_name(label)}")
    elif not str(label).strip():
        ctx.error("label", "empty content")
    if ctx.failed:
        return None
    messages = [Message(role="user", content=text), Message(role="assistant", content=str(label))]
    known = {"text", "label"}
    return ctx.example("classification", record, known, messages=messages, label=str(label))


def _preference(record: dict, ctx: _Context) -> Example | None:
    """TRL style (prompt/chosen/rejected, text or messages) or OpenAI's DPO style."""
    if record.keys() & {"input", "preferred_output", "non_preferred_output"}:
        return _openai_preference(record, ctx)
    if "prompt" not in record and all(
        isinstance(record.get(k), list) for k in ("chosen", "rejected")
    ):
        return _implicit_prompt_preference(record, ctx)
    prompt = _prompt(record, "prompt", ctx)
    chosen = _response_key(record, "chosen", ctx)
    rejected = _response_key(record, "rejected", ctx)
    if ctx.failed or not _distinct_responses([chosen, rejected], ["chosen", "rejected"], ctx):
        return None
    known = {"prompt", "chosen", "rejected"}
    return ctx.example(
        "preference", record, known, prompt_messages=prompt, responses=[chosen, rejected]
    )


def _implicit_prompt_preference(record: dict, ctx: _Context) -> Example | None:
    """TRL's implicit prompt: chosen and rejected are whole conversations sharing a prompt."""
    chosen = _message_list(record["chosen"], "chosen", ctx)
    rejected = _message_list(record["rejected"], "rejected", ctx)
    if chosen is None or rejected is None:
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role != "user":
        shared -= 1  # the prompt ends with the last shared user turn
    if shared == 0:
        ctx.error("prompt", "missing required key (chosen and rejected share no user turn)")
        return None
    prompt = chosen[:shared]
    if not _check_roles(prompt, _fields("chosen", prompt), ctx, last="user"):
        return None
    responses = []
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        fields = _fields(key, messages)[shared:]
        if not _assistant_only(messages[shared:], fields, key, ctx):
            return None
        responses.append(messages[shared:])
    if not _distinct_responses(responses, ["chosen", "rejected"], ctx):
        return None
    known = {"chosen", "rejected"}
    return ctx.example("preference", record, known, prompt_messages=prompt, responses=responses)


def _openai_preference(record: dict, ctx: _Context) -> Example | None:
    """``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``."""
    prompt = None
    if _required(record, "input", ctx):
        value = record["input"]
        if not isinstance(value, dict) or "messages" not in value:
            ctx.error("input", f"expected an object with messages, got {type_name(value)}")
        else:
            prompt = _message_list(value["messages"], "input.messages", ctx)
            fields = _fields("input.messages", prompt or [])
            if prompt is not None and not _check_roles(prompt, fields, ctx, last="user"):
                prompt = None
    preferred = _response_key(record, "preferred_output", ctx)
    rejected = _response_key(record, "non_preferred_output", ctx)
    names = ["preferred_output", "non_preferred_output"]
    if ctx.failed or not _distinct_responses([preferred, rejected], names, ctx):
        return None
    known = {"input", "preferred_output", "non_preferred_output"}
    return ctx.example(
        "preference", record, known, prompt_messages=prompt, responses=[preferred, rejected]
    )


def _ranking(record: dict, ctx: _Context) -> Example | None:
    """``prompt`` + ``responses`` best first, or in any order with ``scores`` (higher is better)."""
    prompt = _prompt(record, "prompt", ctx)
    values = record.get("responses")
    responses: list[list[Message] | None] = []
    if not _required(record, "responses", ctx):
        pass
    elif not isinstance(values, list):
        ctx.error("responses", f"expected an array of responses, got {type_name(values)}")
    elif len(values) < 2:
        ctx.error("responses", f"a ranking needs at least 2 responses, got {len(values)}")
    else:
        responses = [_response(v, f"responses[{i}]", ctx) for i, v in enumerate(values)]
    scores = _scores(record, len(responses), ctx) if responses else None
    if ctx.failed or not _distinct_responses(responses, _fields("responses", responses), ctx):
        return None
    if scores is not None:
        order = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable for ties
        responses, scores = [responses[i] for i in order], [scores[i] for i in order]
    known = {"prompt", "responses", "scores"}
    return ctx.example(
        "ranking", record, known, prompt_messages=prompt, responses=responses, scores=scores
    )


def _scores(record: dict, count: int, ctx: _Context) -> list[float] | None:
    if "scores" not in record:
        return None
    values = record["scores"]
    if not isinstance(values, list):
        ctx.error("scores", f"expected an array of numbers, got {type_name(values)}")
        return None
    if len(values) != count:
        ctx.error("scores", f"expected {count} scores (one per response), got {len(values)}")
        return None
    scores = [_finite(value, f"scores[{i}]", ctx) for i, value in enumerate(values)]
    return None if None in scores else scores  # type: ignore[return-value]


def _distinct_responses(responses: list[list[Message]], fields: list[str], ctx: _Context) -> bool:
    """Every response differs from the others once whitespace is collapsed; False (and an
    error per repeat) otherwise: a pair or ranking of one response twice teaches no preference."""
    first: dict[str, str] = {}
    for response, field in zip(responses, fields, strict=True):
        # NUL joins the messages: it is not whitespace, so message boundaries still count
        key = "\x00".join(" ".join(m.content.split()) for m in response)
        if key in first:
            ctx.error(
                field,
                f"the same response as {first[key]} (after collapsing whitespace): "
                "nothing to prefer",
            )
        else:
            first[key] = field
    return not ctx.failed


def _finite(value: Any, field: str, ctx: _Context) -> float | None:
    """A finite number (booleans are not numbers here, although Python says they are)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        ctx.error(field, f"expected a finite number, got {json.dumps(value)}")
        return None
    return float(value)


def _from_text_cells(ctx: _Context) -> bool:
    """CSV/TSV cells are all text, so there ``4`` and ``true`` arrive as strings."""
    return Path(ctx.source).suffix.lower() in _CSV_DELIMITERS


def _rating(record: dict, ctx: _Context) -> Example | None:
    """``prompt`` + ``response`` + ``rating``: one response scored on any numeric scale
    (higher is better), e.g. 1-5 stars. Read as one response with ``scores=[rating]``."""
    prompt = _prompt(record, "prompt", ctx)
    response = _response_key(record, "response", ctx)
    rating = None
    if _required(record, "rating", ctx):
        value = record["rating"]
        if isinstance(value, str) and _from_text_cells(ctx):
            try:
                value = float(value)
            except ValueError:
                pass  # reported below as the string it is
        rating = _finite(value, "rating", ctx)
    if ctx.failed:
        return None
    return ctx.example(
        "rating",
        record,
        {"prompt", "response", "rating"},
        prompt_messages=prompt,
        responses=[response],
        scores=[rating],
    )


def _unpaired(record: dict, ctx: _Context) -> Example | None:
    """TRL's unpaired preference (KTO): ``prompt`` + ``completion`` + ``label``, a boolean
    (true: a desirable completion, thumbs up; false: undesirable)."""
    prompt = _prompt(record, "prompt", ctx)
    completion = _response_key(record, "completion", ctx)
    label = None
    if _required(record, "label", ctx):
        value = record["label"]
        if isinstance(value, str) and _from_text_cells(ctx):
            value = {"true": True, "false": False}.get(value.strip().lower(), value)
        if isinstance(value, bool):
            label = value
        else:
            ctx.error("label", f"expected true or false, got {json.dumps(value)}")
    if ctx.failed:
        return None
    return ctx.example(
        "unpaired",
        record,
        {"prompt", "completion", "label"},
        prompt_messages=prompt,
        responses=[completion],
        desirable=label,
    )


_NORMALISERS: dict[str, Callable[[dict, _Context], Example | None]] = {
    "prompt_completion": _prompt_completion,
    "chat": _chat,
    "alpaca": _alpaca,
    "classification": _classification,
    "preference": _preference,
    "ranking": _ranking,
    "rating": _rating,
    "unpaired": _unpaired,
    "prompt": _prompt_only,
}
