"""The studio's Feedback pages: labelers rate, choose or rank in the browser.

A client of the feedback store (:mod:`tuneforge.feedback.store`) that ``tuneforge feedback
collect`` writes to: the same sessions, prompts, candidates and judgements, through the same
methods, so a session can be labeled in the terminal and the browser at once. Each answer is a
plain form POST committed by the store before the reply (the page then shows the next item),
so closing the tab loses nothing; answering an item again replaces the answer, as in the store.

Pages, under ``/studio/feedback``:

- the session list, with each session's mode, size and the current labeler's progress;
- a session's page: the next item for the labeler (rate 1-5 with buttons or keys 1-5; choose
  with buttons or keys a/b; rank by dragging or with up/down buttons), skip (key s), progress,
  agreement between labelers (:mod:`.agreement`), and Export, which writes the same pairs,
  ranking, rating and unpaired files as ``tuneforge feedback export`` and offers them for
  download.

The labeler's name lives in a cookie, shown on every page and changeable. Creating a session
(a prompts file, and a model generating the candidates) stays on the command line: the store
holds no generation settings to run it from here (``tuneforge feedback collect`` does it). A
prompt whose candidates were not generated yet is shown as waiting for them.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from tuneforge.feedback.export import DATA_FORMAT, EXPORT_TARGETS, export_feedback
from tuneforge.feedback.store import (
    RATING_SCALE,
    Candidate,
    FeedbackError,
    FeedbackStore,
    Prompt,
    Session,
    now,
)
from tuneforge.studio.agreement import (
    PairKappa,
    krippendorff_alpha,
    pairwise_kappa,
    rating_units,
)
from tuneforge.studio.layout import esc, page
from tuneforge.train.checkpoint import atomic_write_text

PREFIX = "/studio/feedback"
COOKIE = "tuneforge_labeler"
MAX_NAME = 64
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SCRIPTS = ("feedback_label.js",)
STYLE = '<link rel="stylesheet" href="/studio/static/feedback_style.css">'


class FeedbackPageError(Exception):
    """A request the pages refuse: answered with ``status`` and the message, nothing saved."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def feedback_router(db: str | Path | None, *, exports: str | Path | None = None) -> APIRouter:
    """The Feedback pages over the feedback database ``db`` (None: the pages say how to name
    one). Exports go to ``exports`` (default: a folder ``<db name>-exports`` beside the
    database), one folder per session."""
    pages = _FeedbackPages(Path(db) if db else None, Path(exports) if exports else None)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    router.add_api_route("", pages.index, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/labeler", pages.set_labeler, methods=["POST"])
    router.add_api_route("/sessions/{session_id}", pages.session_page, methods=["GET"],
                         response_class=HTMLResponse)
    router.add_api_route("/sessions/{session_id}/answers", pages.answer, methods=["POST"])
    router.add_api_route("/sessions/{session_id}/export", pages.export, methods=["POST"])
    router.add_api_route("/sessions/{session_id}/exports/{target}", pages.download,
                         methods=["GET"])
    return router


# ------------------------------------------------------------------------------ the pages


class _FeedbackPages:
    """The route handlers; each opens its own store (a store is one SQLite connection, and
    handlers run on a thread pool)."""

    def __init__(self, db: Path | None, exports: Path | None) -> None:
        self.db = db
        self.exports = exports or (db.with_name(f"{db.stem}-exports") if db else None)
        self._export_lock = threading.Lock()  # two Export clicks must not share a temp file

    @contextmanager
    def _store(self) -> Iterator[FeedbackStore]:
        if self.db is None:
            raise FeedbackPageError(404, "no feedback database: start the studio with "
                                         "--feedback-db FILE")
        try:
            store = FeedbackStore(self.db, create=False)
        except FeedbackError as err:
            raise FeedbackPageError(404, str(err)) from err
        with store:
            yield store

    def _session(self, store: FeedbackStore, session_id: str) -> Session:
        sessions = store.sessions()
        for s in sessions:
            if str(s.id) == session_id:
                return s
        known = ", ".join(f"{s.id} ({s.name})" for s in sessions) or "none"
        raise FeedbackPageError(
            404, f"no feedback session with id {session_id!r} in {self.db} (sessions: {known})")

    # -------------------------------------------------------------------------- handlers
    # Each handler turns a FeedbackPageError into its 4xx page (the app's error handlers are
    # the core's; a router cannot add its own), never a 500 with a traceback.

    def index(self, request: Request) -> Response:
        labeler = _labeler(request)
        body = _labeler_box(labeler, PREFIX)
        if self.db is None or not self.db.is_file():
            return _html("Feedback", body + _no_database(self.db))
        try:
            with self._store() as store:
                body += self._sessions_table(store, labeler)
        except FeedbackPageError as err:
            return _error(err.status, str(err), PREFIX)
        return _html("Feedback", STYLE + body)

    async def set_labeler(self, request: Request) -> Response:
        form = await request.form()
        back = str(form.get("back") or PREFIX)
        if not back.startswith(PREFIX) or "//" in back:  # only back to a feedback page
            back = PREFIX
        name = str(form.get("name") or "").strip()
        problem = _name_problem(name)
        if problem:
            return _error(400, f"field name (labeler): {problem}", back)
        response = RedirectResponse(back, status_code=303)
        response.set_cookie(COOKIE, quote(name, safe=""), max_age=365 * 24 * 3600,
                            path="/studio", httponly=True, samesite="lax")
        return response

    def session_page(self, request: Request, session_id: str) -> Response:
        labeler = _labeler(request)
        here = f"{PREFIX}/sessions/{session_id}"
        try:
            with self._store() as store:
                session = self._session(store, session_id)
                body = _labeler_box(labeler, here) + _session_facts(session)
                if labeler:
                    body += self._work(store, session, labeler)
                body += _agreement_html(store, session) + self._export_html(session)
        except FeedbackPageError as err:
            return _error(err.status, str(err), PREFIX)
        return _html(f"Feedback: {session.name}", STYLE + body, scripts=SCRIPTS)

    async def answer(self, request: Request, session_id: str) -> Response:
        fields = {key: str(value) for key, value in (await request.form()).items()}
        labeler = _labeler(request)
        back = f"{PREFIX}/sessions/{session_id}"
        try:
            with self._store() as store:
                session = self._session(store, session_id)
                if not labeler:
                    raise FeedbackPageError(400, "no labeler name: enter your name first")
                _record_answer(store, session, labeler, fields)
        except FeedbackPageError as err:
            return _error(err.status, str(err), back)
        return RedirectResponse(f"{back}#item", status_code=303)

    def export(self, session_id: str) -> Response:
        back = f"{PREFIX}/sessions/{session_id}"
        try:
            with self._store() as store, self._export_lock:
                session = self._session(store, session_id)
                try:
                    self._write_exports(store, session)
                except OSError as err:  # a read-only or full disk: say where, keep serving
                    raise FeedbackPageError(
                        409, f"cannot write the exports to {self._export_dir(session)}: {err}"
                    ) from err
        except FeedbackPageError as err:
            return _error(err.status, str(err), back)
        return RedirectResponse(f"{back}#export", status_code=303)

    def download(self, session_id: str, target: str) -> Response:
        try:
            with self._store() as store:
                session = self._session(store, session_id)
            name = target.removesuffix(".jsonl")
            if name not in EXPORT_TARGETS:
                raise FeedbackPageError(
                    404, f"no export {target!r}; exports are {', '.join(EXPORT_TARGETS)}")
            path = self._export_dir(session) / f"{name}.jsonl"
            if not path.is_file():
                raise FeedbackPageError(404, f"session {session.name!r} has no {name} export "
                                             "yet: press Export on its page")
        except FeedbackPageError as err:
            return _error(err.status, str(err), f"{PREFIX}/sessions/{session_id}")
        return FileResponse(path, media_type="application/jsonl",
                            filename=f"{_file_safe(session.name)}-{name}.jsonl")

    def _sessions_table(self, store: FeedbackStore, labeler: str | None) -> str:
        stats = {s["session"]: s for s in store.stats()}
        rows = []
        for s in store.sessions():
            done, total = store.progress(s, labeler) if labeler else (0, 0)
            rows.append(
                f'<tr><td><a href="{PREFIX}/sessions/{s.id}">{esc(s.name)}</a></td>'
                f"<td>{esc(s.mode)}</td><td>{esc(s.model)}</td><td>{s.k}</td>"
                f"<td>{stats[s.name]['prompts']}</td><td>{len(stats[s.name]['annotators'])}</td>"
                f"<td>{f'{done}/{total}' if labeler else '-'}</td></tr>")
        return (
            f"<p>Database <code>{esc(self.db)}</code>, shared with "
            "<code>tuneforge feedback</code>.</p>"
            '<table class="fb-sessions"><thead><tr><th>Session</th><th>Mode</th>'
            "<th>Model</th><th>Replies per prompt</th><th>Prompts</th><th>Labelers</th>"
            "<th>Your progress</th></tr></thead><tbody>"
            + ("".join(rows) or '<tr><td colspan="7">no sessions yet</td></tr>')
            + "</tbody></table>" + _new_session_help(self.db))

    # --------------------------------------------------------------------------- exports

    def _export_dir(self, session: Session) -> Path:
        assert self.exports is not None
        return self.exports / f"{session.id}-{_file_safe(session.name)}"

    def _write_exports(self, store: FeedbackStore, session: Session) -> None:
        """Every export target of the session, as ``tuneforge feedback export --session``
        writes it; a summary (records, sources, what was left out) goes to export.json."""
        folder = self._export_dir(session)
        summary: dict[str, dict] = {}
        for target in EXPORT_TARGETS:
            path = folder / f"{target}.jsonl"
            try:
                result = export_feedback(store, target, path, session=session.name)
            except FeedbackError as err:
                path.unlink(missing_ok=True)  # an older export would no longer be this one's
                summary[target] = {"records": 0, "message": str(err)}
                continue
            summary[target] = {"records": result.records, "sources": dict(result.sources),
                               "dropped": dict(result.dropped)}
        _write_json(folder / "export.json", {"written_at": now(), "targets": summary})

    def _export_html(self, session: Session) -> str:
        folder = self._export_dir(session) if self.exports else None
        rows = ""
        summary_path = folder / "export.json" if folder else None
        if summary_path and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            for target, info in summary["targets"].items():
                if info["records"]:
                    sources = ", ".join(f"{n} from {kind}s"
                                        for kind, n in sorted(info["sources"].items()))
                    dropped = "".join(f"; left out {n} {why}"
                                      for why, n in info["dropped"].items())
                    href = f"{PREFIX}/sessions/{session.id}/exports/{target}.jsonl"
                    cell = (f'<a class="fb-download" data-target="{target}" href="{href}" '
                            f'download>{target}.jsonl</a> {info["records"]} '
                            f"{DATA_FORMAT[target]} records ({esc(sources)}{esc(dropped)})")
                else:
                    cell = f'<span class="fb-muted">nothing: {esc(info["message"])}</span>'
                rows += f"<tr><th>{target}</th><td>{cell}</td></tr>"
            rows = (f'<p class="fb-muted">Last export {esc(summary["written_at"])}, into '
                    f"<code>{esc(folder)}</code>:</p><table>{rows}</table>")
        return (
            '<section id="export" class="fb-box"><h2>Export</h2>'
            "<p>Writes this session's answers, by every labeler, as the training-data files of "
            "<code>tuneforge feedback export --session</code>: pairs (preference), ranking, "
            "rating and unpaired (thumbs up/down).</p>"
            f'<form method="post" action="{PREFIX}/sessions/{session.id}/export">'
            '<button type="submit" id="fb-export">Export</button></form>'
            f"{rows}</section>")

    # ------------------------------------------------------------------------ the work

    def _work(self, store: FeedbackStore, session: Session, labeler: str) -> str:
        done, total = store.progress(session, labeler)
        progress = (
            f'<p class="fb-progress">Progress for {esc(labeler)}: <strong id="fb-done">{done}'
            f'</strong>/<span id="fb-total">{total}</span> prompts '
            f'<progress value="{done}" max="{max(total, 1)}"></progress></p>')
        prompt = store.next_prompt(session, labeler)
        if prompt is None:
            item = ('<p id="fb-finished" class="fb-box">All done: every prompt of this session '
                    "has your answer. Thank you!</p>")
        else:
            candidates = store.candidates(prompt.id)
            if not candidates:
                item = _waiting_for_candidates(session, prompt, self.db)
            else:
                item = _ITEMS[session.mode](store, session, prompt, candidates, labeler)
        return progress + f'<section id="item">{item}</section>'


# ------------------------------------------------------------------------------- answers


def _record_answer(store: FeedbackStore, session: Session, labeler: str,
                   fields: dict[str, str]) -> None:
    """Check a form's answer against the session and give it to the store (which commits it).

    ``prompt`` names the item; then ``skip``, or per mode ``candidate`` + ``rating`` (rate),
    ``chosen`` (choose) or ``order``, candidate ids best first (rank)."""
    prompt_id = _int_field(fields, "prompt")
    if prompt_id not in {p.id for p in store.prompts(session)}:
        raise FeedbackPageError(400, f"field prompt: {prompt_id} is not a prompt of session "
                                     f"{session.name!r}")
    shown = _shown_at(fields.get("shown"))
    field = "prompt"  # the field a refusal of the store is about
    try:
        if "skip" in fields:
            store.skip(prompt_id, labeler, shown_at=shown)
        elif session.mode == "rate":
            candidate = _int_field(fields, "candidate")
            if candidate not in {c.id for c in store.candidates(prompt_id)}:
                raise FeedbackPageError(400, f"field candidate: {candidate} is not a candidate "
                                             f"of prompt {prompt_id}")
            low, high = RATING_SCALE
            field = "rating"
            rating = _int_field(fields, field, f"a whole number from {low} to {high}")
            store.rate(candidate, rating, labeler, shown_at=shown)
        elif session.mode == "choose":
            field = "chosen"
            store.choose(prompt_id, _int_field(fields, field), labeler, shown_at=shown)
        else:
            field, raw = "order", fields.get("order", "")
            parts = [p for p in re.split(r"[\s,]+", raw) if p]
            if not parts or not all(p.isdigit() for p in parts):
                raise FeedbackPageError(400, f"field order: candidate ids best first, "
                                             f"comma-separated; got {raw!r}")
            store.rank(prompt_id, [int(p) for p in parts], labeler, shown_at=shown)
    except FeedbackError as err:
        raise FeedbackPageError(400, f"field {field}: {err}") from err


def _int_field(fields: dict[str, str], name: str, expected: str = "a whole number") -> int:
    value = fields.get(name)
    if value is None:
        raise FeedbackPageError(400, f"field {name}: missing")
    if not re.fullmatch(r"-?\d{1,12}", value.strip()):
        raise FeedbackPageError(400, f"field {name}: {expected}, got {value!r}")
    return int(value)


def _shown_at(value: str | None) -> str | None:
    """When the page showed the item (the time it was rendered), if the form sent a valid one."""
    if not value or len(value) > 40:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


# --------------------------------------------------------------------------------- items


def _prompt_html(prompt: Prompt) -> str:
    messages = "".join(
        f'<div class="fb-message fb-{esc(m.get("role"))}"><span class="fb-role">'
        f'{esc(m.get("role"))}</span><div class="fb-text">{esc(m.get("content"))}</div></div>'
        for m in prompt.messages)
    return f'<div class="fb-prompt"><h2>Prompt {prompt.position + 1}</h2>{messages}</div>'


def _candidate_text(candidate: Candidate) -> str:
    if not candidate.text.strip():
        return '<div class="fb-text fb-muted">(empty reply)</div>'
    return f'<div class="fb-text">{esc(candidate.text)}</div>'


def _form(session: Session, prompt: Prompt, inner: str, *, mode: str) -> str:
    # s skips, unless s is a candidate's letter (choose with 19 or more candidates)
    skip_key = "" if mode == "choose" and "s" in LETTERS[:session.k] else "s"
    return (
        f'<form method="post" action="{PREFIX}/sessions/{session.id}/answers" '
        f'class="fb-item" data-mode="{mode}">'
        f'<input type="hidden" name="prompt" value="{prompt.id}">'
        f'<input type="hidden" name="shown" value="{esc(now())}">{inner}'
        f'<p class="fb-actions"><button type="submit" name="skip" value="1" '
        f'data-key="{skip_key}" class="fb-skip">Skip'
        f'{f" <kbd>{skip_key}</kbd>" if skip_key else ""}</button></p></form>')


def _rate_item(store: FeedbackStore, session: Session, prompt: Prompt,
               candidates: list[Candidate], labeler: str) -> str:
    candidate = store.unrated(prompt.id, labeler)[0]
    low, high = RATING_SCALE
    buttons = "".join(
        f'<button type="submit" name="rating" value="{n}" data-key="{n}" class="fb-rate">'
        f"{n} <kbd>{n}</kbd></button>" for n in range(low, high + 1))
    inner = (
        f'<input type="hidden" name="candidate" value="{candidate.id}">'
        f'<div class="fb-candidate" data-candidate="{candidate.id}"><h3>Reply '
        f"{candidate.position + 1} of {len(candidates)}</h3>{_candidate_text(candidate)}</div>"
        f'<p class="fb-hint">Rate it from {low} (bad) to {high} (excellent): click or press '
        f'a key.</p><p class="fb-buttons">{buttons}</p>')
    return _prompt_html(prompt) + _form(session, prompt, inner, mode="rate")


def _choose_item(store: FeedbackStore, session: Session, prompt: Prompt,
                 candidates: list[Candidate], labeler: str) -> str:
    cards = "".join(
        f'<div class="fb-candidate" data-candidate="{c.id}"><h3>{LETTERS[i].upper()}</h3>'
        f"{_candidate_text(c)}"
        f'<button type="submit" name="chosen" value="{c.id}" data-key="{LETTERS[i]}" '
        f'class="fb-choose">{LETTERS[i].upper()} is better <kbd>{LETTERS[i]}</kbd></button>'
        "</div>" for i, c in enumerate(candidates))
    inner = (f'<p class="fb-hint">Which reply is better? Click or press '
             f'{" / ".join(LETTERS[:len(candidates)])}.</p><div class="fb-side">{cards}</div>')
    return _prompt_html(prompt) + _form(session, prompt, inner, mode="choose")


def _rank_item(store: FeedbackStore, session: Session, prompt: Prompt,
               candidates: list[Candidate], labeler: str) -> str:
    items = "".join(
        f'<li class="fb-rank-item" draggable="true" data-id="{c.id}">'
        '<span class="fb-handle" aria-hidden="true">&#8801;</span>'
        f'<span class="fb-rank-label">Reply {c.position + 1}</span>{_candidate_text(c)}'
        f'<span class="fb-move"><button type="button" class="fb-up" aria-label="move reply '
        f'{c.position + 1} up">&#8593;</button><button type="button" class="fb-down" '
        f'aria-label="move reply {c.position + 1} down">&#8595;</button></span></li>'
        for c in candidates)
    order = ",".join(str(c.id) for c in candidates)
    inner = (
        '<p class="fb-hint">Drag the replies into order, best at the top (or use the arrow '
        "buttons), then save.</p>"
        f'<ol class="fb-rank" id="fb-rank">{items}</ol>'
        f'<input type="hidden" name="order" id="fb-order" value="{order}">'
        '<p class="fb-buttons"><button type="submit" class="fb-save" id="fb-save">Save ranking'
        "</button></p>")
    return _prompt_html(prompt) + _form(session, prompt, inner, mode="rank")


_ITEMS: dict[str, Callable[..., str]] = {
    "rate": _rate_item, "choose": _choose_item, "rank": _rank_item}


def _waiting_for_candidates(session: Session, prompt: Prompt, db: Path | None) -> str:
    return (
        '<div class="fb-box" id="fb-waiting"><p>The next prompt (number '
        f"{prompt.position + 1}) has no replies to judge yet: they are generated by the command "
        "line, where the model runs. Someone with a terminal runs, for example:</p>"
        f"<pre>tuneforge feedback collect {esc(session.model)} --prompts PROMPTS.jsonl "
        f"--db {esc(db)} --mode {esc(session.mode)} -k {session.k} --session "
        f"{esc(session.name)}</pre></div>")


# ------------------------------------------------------------------------------ agreement


def _agreement_html(store: FeedbackStore, session: Session) -> str:
    """Agreement between the session's labelers: kappa per pair of labelers for choices,
    alpha (interval) over candidates for ratings, alpha (ordinal) over rank positions."""
    choices: dict[str, dict[int, str]] = defaultdict(dict)
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for j in store.judgements(session):
        if j.kind == "choice":
            position = next(c.position for c in j.candidates if c.id == j.value)
            choices[j.annotator][j.prompt.id] = LETTERS[position]
        elif j.kind == "rating":
            values[j.annotator][j.candidate_id] = j.value
        elif j.kind == "ranking":
            for place, candidate_id in enumerate(j.value, start=1):
                values[j.annotator][candidate_id] = place
    head = '<section id="agreement" class="fb-box"><h2>Agreement between labelers</h2>'
    if session.mode == "choose":
        return head + _kappa_html(pairwise_kappa(choices)) + "</section>"
    metric = "interval" if session.mode == "rate" else "ordinal"
    what = ("ratings of each reply (interval metric: the 1-5 steps are taken as equal)"
            if session.mode == "rate" else
            "each reply's place in the rankings (ordinal metric)")
    units = rating_units(values)
    shared = sum(len(u) >= 2 for u in units)
    alpha = krippendorff_alpha(units, metric)
    return (head + f"<p>Krippendorff's alpha over {what}: "
            f'<strong id="fb-alpha" data-value="{_repr(alpha)}">{_fmt(alpha)}</strong> '
            f"({_count(len(values), 'labeler')}, {_count(shared, 'reply', 'replies')} judged "
            "by two or more).</p>"
            + _scale_note() + "</section>")


def _kappa_html(pairs: list[PairKappa]) -> str:
    if not pairs:
        return "<p>Cohen's kappa needs two labelers who judged the same prompts.</p>"
    rows = "".join(
        f'<tr class="fb-kappa-row"><td>{esc(p.first)}</td><td>{esc(p.second)}</td>'
        f"<td>{p.items}</td><td>{p.agreed}</td>"
        f'<td class="fb-kappa" data-value="{_repr(p.kappa)}">{_fmt(p.kappa)}</td></tr>'
        for p in pairs)
    known = [p.kappa for p in pairs if p.kappa is not None]
    mean = ""
    if len(pairs) > 1 and known:
        light = sum(known) / len(known)
        mean = (f"<p>Mean over pairs (Light's kappa): <strong>{_fmt(light)}</strong></p>")
    return ("<p>Cohen's kappa of each two labelers, on the prompts both chose for (the choice "
            "counted as the position, A or B, of the reply chosen):</p>"
            '<table class="fb-agreement"><thead><tr><th>Labeler</th><th>Labeler</th>'
            "<th>Both judged</th><th>Same choice</th><th>Kappa</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{mean}" + _scale_note())


def _scale_note() -> str:
    return ('<p class="fb-muted">1 is perfect agreement, 0 what chance would give, below 0 '
            "systematic disagreement; - where it is undefined (no shared items, or a single "
            "answer throughout).</p>")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _repr(value: float | None) -> str:
    return "" if value is None else repr(value)


# ---------------------------------------------------------------------------- page parts


def _labeler(request: Request) -> str | None:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    name = unquote(raw).strip()
    return None if _name_problem(name) else name


def _name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters, got {len(name)}"
    if not name.isprintable():
        return "letters, digits, spaces and punctuation only"
    return None


def _labeler_box(labeler: str | None, back: str) -> str:
    who = (f'<span>Labeling as <strong id="fb-labeler">{esc(labeler)}</strong> · not you? '
           "Your name:</span>" if labeler else
           "<span><strong>Who is labeling?</strong> Enter your name to start:</span>")
    return (
        f'<form class="fb-who" method="post" action="{PREFIX}/labeler">{who} '
        f'<input type="hidden" name="back" value="{esc(back)}">'
        f'<input name="name" id="fb-name" maxlength="{MAX_NAME}" required '
        f'placeholder="your name" value="{esc(labeler or "")}" autocomplete="username">'
        '<button type="submit" id="fb-name-save">Save</button></form>')


def _session_facts(session: Session) -> str:
    what = {"rate": "rate each reply from 1 to 5", "choose": "choose the better of the replies",
            "rank": "rank the replies, best first"}[session.mode]
    return (f'<p class="fb-facts"><a href="{PREFIX}">All sessions</a> · mode '
            f"<strong>{esc(session.mode)}</strong> ({what}) · {session.k} replies per prompt "
            f"from <code>{esc(session.model)}</code></p>")


def _no_database(db: Path | None) -> str:
    where = (f"<code>{esc(db)}</code> does not exist yet" if db else
             "no feedback database was named (start the studio with --feedback-db FILE)")
    return f"<p>The feedback database: {where}.</p>" + _new_session_help(db)


def _new_session_help(db: Path | None) -> str:
    return (
        '<details class="fb-box"><summary>Start a new session</summary><p>A session (prompts, '
        "and replies generated by a model) is started on the command line; labelers then "
        "work on it here:</p>"
        "<pre>tuneforge feedback collect MODEL --prompts PROMPTS.jsonl "
        f"--db {esc(db or 'feedback.sqlite')} --mode choose -k 2 --session NAME</pre>"
        "<p>(<code>--mode rate</code> or <code>--mode rank -k 3</code> for the other kinds; "
        "stop it with q once the replies you need are generated.)</p></details>")


def _html(title: str, body: str, *, status: int = 200, scripts: tuple[str, ...] = ()) -> Response:
    return HTMLResponse(page(title, body, scripts=scripts), status_code=status)


def _error(status: int, message: str, back: str) -> Response:
    body = (f'<p class="fb-error" role="alert">{esc(message)}</p>'
            f'<p><a href="{esc(back)}">Back</a></p>')
    return _html("Feedback: not saved" if status == 400 else "Feedback: not found", STYLE + body,
                 status=status)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "session"


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=2))
