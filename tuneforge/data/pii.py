"""Personal data and secrets in text: find them, and mask them with a placeholder per kind.

Kinds and what counts (each checked beyond its shape, to keep false positives low):

- ``EMAIL``: ``name@domain.tld``.
- ``PHONE``: an international number (``+`` or ``00``, then 8-15 digits, separators allowed) or
  a national one written as phone numbers are: 9-12 digits in groups split by spaces, dots or
  dashes, with at least three groups, a parenthesised area code or a leading ``0``. Not phone
  numbers: a bare run of digits (an order id), a date (``2024-01-15``, ``15.01.2024``, with or
  without a time), a dotted quad or version (``10.0.19041.1234``), an amount written with
  thousands separators (``1 000 000 000``), and anything card-length.
- ``CARD``: 13-19 digits (spaces or dashes between groups) that pass the Luhn check; a
  card-shaped number that fails it is left alone, and its digits are no phone number either.
- ``IBAN``: a country code, two check digits and 11-30 letters/digits (spaces allowed) whose
  ISO 7064 mod-97 check gives 1. Text that runs on after an IBAN is trimmed off at a space
  before checking; an IBAN-shaped string that fails the check is left alone, digits and all.
- ``IP``: IPv4 with every octet 0-255, or IPv6 (full or ``::``-compressed, parsed by
  :mod:`ipaddress`, with at least two groups and a digit, so ``std::vector`` and ``::1`` stay).
- ``SECRET``: API keys by their known prefixes (``sk-``, ``sk_live_``, ``ghp_``/``gho_``/
  ``github_pat_``, ``xox[bpa]-``, ``AKIA``/``ASIA`` AWS key ids, ``AIza`` Google keys,
  ``glpat-``), the token after ``Bearer``, and any other token of 32+ characters that mixes
  upper case, lower case and digits in short runs (random-looking). Hex strings such as git
  hashes and UUIDs have no upper case, and CamelCase identifiers are long words, so they stay.

Matching is by patterns and checksums, not a model: it catches the structured kinds above, not
names or street addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

KINDS = ("EMAIL", "PHONE", "CARD", "IBAN", "IP", "SECRET")
# Which kind wins when two matches start at the same place (an email's digits are no phone).
_PRIORITY = {kind: i for i, kind in enumerate(("EMAIL", "SECRET", "IBAN", "CARD", "IP", "PHONE"))}


@dataclass(frozen=True)
class PiiMatch:
    """One span of ``text[start:end]`` found to be of ``kind``."""

    kind: str
    start: int
    end: int
    text: str


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_SECRET_PREFIXED = re.compile(
    r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|"
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|"
    r"xox[bpars]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[A-Z0-9]{16}|AIza[A-Za-z0-9_-]{35}|"
    r"glpat-[A-Za-z0-9_-]{20,})"
)
_BEARER = re.compile(r"\bBearer\s+([A-Za-z0-9._~+/=-]{16,})")
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_/+=-])[A-Za-z0-9_\-+/=]{32,}(?![A-Za-z0-9_/+=-])")
_WORDISH = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])[1-9](?:[ -]?\d){12,18}(?![\d-])")  # no card starts with 0
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}(?:[ .-]\d{1,8}){1,5}(?!\w)"
    r"|(?<![\w+])\+\d{8,15}(?!\w)"
)
# Digit groups that look like phone numbers but are not: hidden before phones are searched.
_NOT_PHONE = re.compile(
    r"(?<!\d)(?:(?:19|20)\d\d[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./](?:19|20)\d\d)"
    r"(?:[ T]\d{1,2}:\d{2}(?::\d{2})?)?(?!\d)"
    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)"
)
_AMOUNT = re.compile(r"\d{1,2}(?:[ .,]\d{3}){3,}")  # 1 000 000 000 (thousands separators)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (payment cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 IBAN check: move the first four characters to the end, letters to numbers
    (A=10 ... Z=35); the number mod 97 must be 1."""
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s.isalnum() or not s.isascii():
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _phone_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if text.startswith("+") or text.startswith("00"):
        return 8 <= len(digits) - (2 * text.startswith("00")) <= 15
    if not 9 <= len(digits) <= 12:  # longer national runs are cards, accounts, ids
        return False
    if _AMOUNT.fullmatch(text):
        return False
    groups = re.split(r"[ .-]+", text.replace("(", " ").replace(")", " ").strip())
    if any(len(group) == 1 for group in groups[1:]):  # 10.0.19041.1234 is a version
        return False
    return text.startswith("(") or text.startswith("0") or len(groups) >= 3


def _random_looking(token: str) -> bool:
    """Upper case, lower case and digits, in runs shorter than words (random keys average
    under 2 characters a run; CamelCase identifiers over 3.5)."""
    if not (
        any(c.isupper() for c in token)
        and any(c.islower() for c in token)
        and any(c.isdigit() for c in token)
    ):
        return False
    runs = _WORDISH.findall(token)
    return sum(map(len, runs)) / len(runs) < 3.5


def _ipv6_ok(text: str) -> bool:
    groups = [g for g in text.split(":") if g]
    if len(groups) < 2 or not any(c.isdigit() for c in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _iban_span(m: re.Match) -> tuple[int, int] | None:
    """The longest valid IBAN at the start of an IBAN-shaped match, cut at a space or the end."""
    text = m.group(0)
    ends = [len(text)] + [i for i in range(len(text) - 1, 0, -1) if text[i] == " "]
    for end in ends:
        if iban_ok(text[:end]):
            return m.start(), m.start() + end
    return None


def _card_span(m: re.Match) -> tuple[int, int] | None:
    """The match, or its longest prefix ending at a separator, that is a Luhn-valid card
    (``4111 1111 1111 1111 12/25`` holds a card followed by an expiry month)."""
    text = m.group(0)
    ends = [len(text)] + [i for i in range(len(text) - 1, 0, -1) if text[i] in " -"]
    for end in ends:
        digits = re.sub(r"\D", "", text[:end])
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return m.start(), m.start() + end
    return None


def find_pii(text: str) -> list[PiiMatch]:
    """Every PII match in ``text``, left to right, none overlapping: of matches that overlap,
    the one starting first wins, then the one of the more specific kind, then the longer."""
    spans: list[tuple[str, int, int]] = []
    spans += [("EMAIL", *m.span()) for m in _EMAIL.finditer(text)]
    spans += [("SECRET", *m.span()) for m in _SECRET_PREFIXED.finditer(text)]
    spans += [("SECRET", *m.span(1)) for m in _BEARER.finditer(text)]
    spans += [("SECRET", *m.span()) for m in _LONG_TOKEN.finditer(text) if _random_looking(m[0])]
    # Shapes that fail their checksum are reserved: no kind may claim their digits.
    reserved: list[tuple[int, int]] = []
    for pattern, valid_span, kind in ((_IBAN, _iban_span, "IBAN"), (_CARD, _card_span, "CARD")):
        for m in pattern.finditer(text):
            span = valid_span(m)
            if span is None:
                reserved.append(m.span())
            else:
                spans.append((kind, *span))
    for m in _IPV4.finditer(text):
        if all(int(octet) <= 255 for octet in m[0].split(".")):
            spans.append(("IP", *m.span()))
    spans += [("IP", *m.span()) for m in _IPV6.finditer(text) if _ipv6_ok(m[0])]
    hidden = _NOT_PHONE.sub(lambda m: "_" * len(m[0]), text)  # same length: offsets hold
    for m in _PHONE.finditer(hidden):
        if _phone_ok(m[0]) and not any(a < m.end() and m.start() < b for a, b in reserved):
            spans.append(("PHONE", *m.span()))
    spans.sort(key=lambda s: (s[1], _PRIORITY[s[0]], s[1] - s[2]))
    kept: list[PiiMatch] = []
    for kind, start, end in spans:
        if kept and start < kept[-1].end:
            continue
        kept.append(PiiMatch(kind, start, end, text[start:end]))
    return kept


def mask_pii(text: str) -> tuple[str, Counter]:
    """``text`` with each match replaced by ``[KIND]``, and the count of each kind masked."""
    counts: Counter = Counter()
    out, last = [], 0
    for m in find_pii(text):
        out += [text[last : m.start], f"[{m.kind}]"]
        last = m.end
        counts[m.kind] += 1
    out.append(text[last:])
    return "".join(out), counts
