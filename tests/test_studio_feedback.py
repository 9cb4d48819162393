"""The studio's Feedback pages: agreement statistics against values worked out by hand, bad
answers refused with nothing saved lost, and labeling in a real headless Chromium: two labelers
choose on five A/B pairs and see their kappa and the export, a labeler rates by key, another
ranks by dragging.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from browser import chromium_or_skip, launch, live_studio

from tuneforge.cli import main
from tuneforge.feedback.store import FeedbackStore, Session
from tuneforge.jobs.store import JobStore, default_url
from tuneforge.serve.app import ServeSettings
from tuneforge.serve.engine import load_served_models
from tuneforge.studio.agreement import (
    cohen_kappa,
    krippendorff_alpha,
    pairwise_kappa,
    rating_units,
)
from tuneforge.studio.app import create_studio_app
from tuneforge.studio.feedback import COOKIE

FEEDBACK = "/studio/feedback"

# ---------------------------------------------------------------------------- agreement


def test_kappa_of_a_textbook_table() -> None:
    # 50 items, yes/no: both yes 20, yes/no 5, no/yes 10, both no 15. p_o = 35/50 = 0.7;
    # first says yes 25/50, second 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5.
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_kappa_of_five_choices_by_hand() -> None:
    # ana A A B B A, ben A B B B A: same on 4 of 5, p_o = 0.8; ana A 3/5 B 2/5, ben A 2/5
    # B 3/5: p_e = (3*2 + 2*3) / 25 = 0.48; kappa = 0.32 / 0.52 = 8/13.
    assert cohen_kappa(list(zip("AABBA", "ABBBA"))) == pytest.approx(8 / 13)
    assert cohen_kappa(list(zip("ABAB", "ABAB"))) == pytest.approx(1.0)
    assert cohen_kappa(list(zip("ABAB", "BABA"))) == pytest.approx(-1.0)
    assert cohen_kappa(list(zip("AAA", "AAA"))) is None  # one answer throughout: 0/0
    assert cohen_kappa([]) is None


def test_pairwise_kappa_compares_only_shared_items() -> None:
    answers = {
        "ben": dict(zip(range(5), "ABBBA")),
        "ana": dict(zip(range(5), "AABBA")) | {9: "B"},  # item 9: nobody else judged it
        "cy": {0: "A", 1: "B"},
    }
    by_pair = {(p.first, p.second): p for p in pairwise_kappa(answers)}
    assert list(by_pair) == [("ana", "ben"), ("ana", "cy"), ("ben", "cy")]
    ana_ben = by_pair[("ana", "ben")]
    assert (ana_ben.items, ana_ben.agreed) == (5, 4)
    assert ana_ben.kappa == pytest.approx(8 / 13)
    # ana and cy share items 0, 1: A/A and A/B. p_o = 1/2; ana all A, so p_e = 1 * 1/2 = 1/2:
    # kappa = 0 (their agreement is what chance gives).
    assert (by_pair[("ana", "cy")].items, by_pair[("ana", "cy")].kappa) == (2, 0.0)
    assert by_pair[("ben", "cy")].kappa == pytest.approx(1.0)


# Four replies rated by two labelers: (5, 4), (2, 2), (4, 5), (1, 1). Every unit has m = 2, so
# each ordered pair weighs 1/(m-1) = 1: o(4,5) = o(5,4) = 2, o(1,1) = o(2,2) = 2; each of the
# values 1, 2, 4, 5 has n_v = 2, and n = 8.
SMALL = [[5, 4], [2, 2], [4, 5], [1, 1]]


def test_alpha_interval_by_hand() -> None:
    # D_o = (2*1 + 2*1) / 8 = 1/2. D_e = sum over ordered pairs n_c n_k (c-k)^2 / (8*7):
    # unordered (c-k)^2 over {1,2,4,5}: 1+9+16+4+9+1 = 40, ordered 80, times n_c n_k = 4:
    # 320/56. alpha = 1 - (1/2) / (320/56) = 1 - 28/320 = 73/80.
    assert krippendorff_alpha(SMALL, "interval") == pytest.approx(73 / 80)


def test_alpha_nominal_and_ordinal_by_hand() -> None:
    # Nominal: D_o = 4/8 (the four 4/5 coincidences); D_e = (8^2 - 4*2^2) / 56 = 48/56;
    # alpha = 1 - (1/2)(56/48) = 5/12.
    assert krippendorff_alpha(SMALL, "nominal") == pytest.approx(5 / 12)
    # Ordinal: d(c,k) = (sum of n_g for c <= g <= k - (n_c + n_k)/2)^2: d(4,5) = (4-2)^2 = 4,
    # d(1,2) = 4, d(2,4) = 4, d(1,4) = (6-2)^2 = 16, d(2,5) = 16, d(1,5) = (8-2)^2 = 36.
    # D_o = 4 * 4 / 8 = 2; D_e = 4 * 2 * (4+4+4+16+16+36) / 56 = 640/56; alpha = 1 - 112/640.
    assert krippendorff_alpha(SMALL, "ordinal") == pytest.approx(1 - 112 / 640)


def test_alpha_on_krippendorffs_published_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units,
    # values 1-5 with missing data; published alpha: nominal .743, ordinal .815, interval .849.
    none = None
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, none, none, none],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, none, 3],
        [none, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, none],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, none],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*observers)]
    assert round(krippendorff_alpha(units, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, "interval"), 3) == 0.849


def test_alpha_edge_cases() -> None:
    assert krippendorff_alpha([[3], [4]]) is None  # no unit with two values
    assert krippendorff_alpha([[3, 3], [3, 3, 3]]) is None  # one value throughout
    assert krippendorff_alpha([[1, 5], [3]]) == krippendorff_alpha([[1, 5]])  # lone value ignored
    with pytest.raises(ValueError, match="metric 'ratio' unknown"):
        krippendorff_alpha(SMALL, "ratio")
    units = rating_units({"ben": {10: 4, 11: 2}, "ana": {10: 5, 12: 1}})
    assert units == [[5, 4], [2], [1]]


# ------------------------------------------------------------------------------ helpers


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def make_session(db: Path, name: str, mode: str, replies: list[list[str]]) -> Session:
    """A session whose prompts already have their replies, as ``feedback collect`` leaves it
    (set up through the store; no model needed)."""
    with FeedbackStore(db) as store:
        session = store.start_session(name, mode, "tiny:llama", len(replies[0]))
        store.add_prompts(session, [(user(f"question {i}"), {}, f"prompts.jsonl:{i + 1}")
                                    for i in range(len(replies))])
        for prompt, texts in zip(store.prompts(session), replies):
            store.add_candidates(prompt.id, texts, model="tiny:llama", params={"seed": 0})
    return session


@pytest.fixture(scope="module")
def models():
    return load_served_models("tiny:llama")


@contextmanager
def studio(models, db: Path) -> Iterator[str]:
    """The whole studio app (no keys, loopback) with ``db`` as its feedback store, served on a
    free port; yields the base URL."""
    jobs = db.parent / "jobs"
    jobs.mkdir(exist_ok=True)
    app = create_studio_app(models, JobStore(default_url(jobs)), jobs, db.parent / "runs",
                            ServeSettings(rate_limit=0), feedback_db=db)
    with live_studio(app) as url:
        yield url


def ids(db: Path, session: Session) -> list[list[int]]:
    with FeedbackStore(db) as store:
        return [[c.id for c in store.candidates(p.id)] for p in store.prompts(session)]


def answers(db: Path, session: Session) -> dict[tuple[str, int, int | None], object]:
    """``(labeler, prompt position, candidate id) -> (kind, value)`` of every stored answer."""
    with FeedbackStore(db) as store:
        return {(j.annotator, j.prompt.position, j.candidate_id): (j.kind, j.value)
                for j in store.judgements(session)}


# ------------------------------------------------------------------------- bad answers


def test_bad_answers_are_refused_and_nothing_saved_is_lost(models, tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    rate = make_session(db, "rate", "rate", [["r0", "r1"]])
    rank = make_session(db, "rank", "rank", [["x", "y", "z"]])
    with studio(models, db) as base, httpx.Client(base_url=base, timeout=60) as client:
        check_refusals(db, client, rate, rank)
    assert not (tmp_path / "fb-exports").exists()  # nothing exported, nothing written


def check_refusals(db: Path, client: httpx.Client, rate: Session, rank: Session) -> None:
    [[c0, c1]], [[x, y, z]] = ids(db, rate), ids(db, rank)
    rate_url, rank_url = f"{FEEDBACK}/sessions/{rate.id}", f"{FEEDBACK}/sessions/{rank.id}"

    def post(url: str, **fields: object):
        return client.post(f"{url}/answers", data=fields, follow_redirects=False)

    def refusal(response) -> str:
        return re.search(r'class="fb-error" role="alert">([^<]*)<', response.text).group(1)

    # No labeler yet: nothing can be saved, and the page asks for a name.
    assert post(rate_url, prompt=1, candidate=c0, rating=4).status_code == 400
    assert "Who is labeling?" in client.get(rate_url).text
    response = client.post(f"{FEEDBACK}/labeler", data={"name": "  ", "back": rate_url})
    assert response.status_code == 400 and "field name (labeler): must not be empty" in \
        refusal(response)
    response = client.post(f"{FEEDBACK}/labeler", data={"name": "ana", "back": rate_url},
                           follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, rate_url)
    assert client.cookies[COOKIE] == "ana"

    assert post(rate_url, prompt=1, candidate=c0, rating=4).status_code == 303
    response = post(rate_url, prompt=1, candidate=c0, rating=7)
    assert response.status_code == 400
    assert refusal(response) == "field rating: a rating is a whole number from 1 to 5, got 7"
    assert refusal(post(rate_url, prompt=1, candidate=c0, rating="five")) == \
        "field rating: a whole number from 1 to 5, got &#x27;five&#x27;"
    assert post(rate_url, prompt=1, candidate=x, rating=3).status_code == 400  # rank's reply
    assert post(rate_url, prompt=2, candidate=x, rating=3).status_code == 400  # rank's prompt
    assert post(rate_url, prompt=1, candidate=c1).status_code == 400  # no rating at all

    assert post(rank_url, prompt=2, order=f"{x},{y},{z}").status_code == 303
    for order in (f"{x},{y}", f"{x},{x},{y}", f"{x},{y},{z},{c0}", "", "first,second"):
        response = post(rank_url, prompt=2, order=order)
        assert response.status_code == 400 and refusal(response).startswith("field order:")
    assert "lists each of prompt 2&#x27;s candidates" in refusal(post(rank_url, prompt=2,
                                                                     order=f"{z},{y}"))

    for url in (f"{FEEDBACK}/sessions/9", f"{FEEDBACK}/sessions/abc"):
        response = client.get(url)
        assert response.status_code == 404 and "no feedback session with id" in response.text
        assert post(url, prompt=1, candidate=c0, rating=4).status_code == 404
    assert client.get(f"{rate_url}/exports/pairs.jsonl").status_code == 404  # not exported yet
    assert client.get(f"{rate_url}/exports/secrets.txt").status_code == 404

    # Every accepted answer is there, as given; none of the refused ones.
    assert answers(db, rate) == {("ana", 0, c0): ("rating", 4)}
    assert answers(db, rank) == {("ana", 0, None): ("ranking", [x, y, z])}


def test_pages_without_a_database(models, tmp_path: Path) -> None:
    db = tmp_path / "missing.sqlite"
    with studio(models, db) as base, httpx.Client(base_url=base, timeout=60) as client:
        page = client.get(FEEDBACK)
        assert page.status_code == 200 and "missing.sqlite</code> does not exist yet" in page.text
        assert "tuneforge feedback collect MODEL" in page.text
        assert client.get(f"{FEEDBACK}/sessions/1").status_code == 404
    assert not (tmp_path / "missing.sqlite").exists()  # looking never creates a database


def test_a_prompt_without_replies_waits_for_the_command_line(models, tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    with FeedbackStore(db) as store:  # started by `feedback collect`, nothing generated yet
        session = store.start_session("later", "choose", "builtin:smollm2-135m-instruct", 2)
        store.add_prompts(session, [(user("hi"), {}, "p.jsonl:1")])
    with studio(models, db) as base, httpx.Client(base_url=base, timeout=60) as client:
        client.cookies.set(COOKIE, "ana")
        page = client.get(f"{FEEDBACK}/sessions/{session.id}")
        assert page.status_code == 200 and 'id="fb-waiting"' in page.text
        assert ("tuneforge feedback collect builtin:smollm2-135m-instruct --prompts "
                f"PROMPTS.jsonl --db {db} --mode choose -k 2 --session later") in page.text
        assert 'class="fb-item"' not in page.text


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@contextmanager
def labeler(browser, base: str, session: Session, name: str) -> Iterator[object]:
    """A browser tab of its own (own cookies) that opens the Feedback page, enters ``name`` and
    picks the session from the list; no error may happen in the page's script."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{base}{FEEDBACK}")
    page.fill("#fb-name", name)
    page.click("#fb-name-save")
    page.wait_for_selector(f"#fb-labeler:text-is('{name}')")
    page.click(f"table.fb-sessions a:text-is('{session.name}')")
    page.wait_for_selector(f"h1:has-text('{session.name}')")
    ready(page)
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


def wait_done(page, done: int) -> None:
    """Wait for the page that shows ``done`` prompts finished, and for its script."""
    from playwright.sync_api import expect

    expect(page.locator("#fb-done")).to_have_text(str(done))
    ready(page)


def ready(page) -> None:
    """Wait for the page script to listen for keys, when there is an item to answer (a key
    pressed before the deferred script runs is lost)."""
    page.wait_for_selector("form.fb-item[data-ready], #fb-finished, #fb-waiting",
                           state="attached")


def test_two_labelers_choose_see_agreement_and_export(browser, models, tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    replies = [[f"reply A to {i}", f"reply B to {i}"] for i in range(5)]
    session = make_session(db, "support replies", "choose", replies)
    picks = {"ana": "aabba", "ben": "abbba"}  # kappa 8/13, worked out above
    with studio(models, db) as base:
        with labeler(browser, base, session, "ana") as page:
            for i, letter in enumerate(picks["ana"]):  # by keyboard
                page.keyboard.press(letter)
                wait_done(page, i + 1)
        with labeler(browser, base, session, "ben") as page:
            page.screenshot(path=str(tmp_path / "feedback-choose.png"), full_page=True)
            for i, letter in enumerate(picks["ben"]):  # by mouse
                page.click(f"button.fb-choose[data-key='{letter}']")
                wait_done(page, i + 1)
            assert page.locator("#fb-finished").is_visible()
            kappa = page.locator("td.fb-kappa")
            assert kappa.text_content() == f"{8 / 13:.3f}" == "0.615"
            assert float(kappa.get_attribute("data-value")) == pytest.approx(8 / 13)
            row = page.locator("tr.fb-kappa-row td")
            assert row.all_text_contents()[:4] == ["ana", "ben", "5", "4"]

            page.click("#fb-export")
            page.wait_for_selector("a.fb-download[data-target='pairs']")
            page.screenshot(path=str(tmp_path / "feedback-agreement.png"), full_page=True)
            with page.expect_download() as download:
                page.click("a.fb-download[data-target='pairs']")
            downloaded = tmp_path / "downloaded-pairs.jsonl"
            download.value.save_as(downloaded)
            assert download.value.suggested_filename == "support_replies-pairs.jsonl"

    records = [json.loads(line) for line in downloaded.read_text().splitlines()]
    expected = []
    for i in range(5):  # the store's order: prompt, then labeler
        for name in ("ana", "ben"):
            chosen = "ab".index(picks[name][i])
            expected.append({"prompt": f"question {i}", "chosen": replies[i][chosen],
                             "rejected": replies[i][1 - chosen],
                             "meta": {"session": "support replies", "prompt": i,
                                      "annotator": name}})
    assert records == expected
    # The same file as `tuneforge feedback export` writes.
    cli_out = tmp_path / "cli-pairs.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--to", "pairs", "--session",
                 "support replies", "--out", str(cli_out)]) == 0
    assert cli_out.read_bytes() == downloaded.read_bytes()


def test_rating_by_keys_with_a_skip(browser, models, tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    session = make_session(db, "ratings", "rate", [["one", "two"], ["three", "four"], ["x", "y"]])
    (a, b), (c, d), _ = ids(db, session)
    with FeedbackStore(db) as store:  # a second labeler, who rated earlier in the terminal
        for candidate, rating in zip((a, b, c, d), (4, 2, 5, 1)):
            store.rate(candidate, rating, "ben")
    with studio(models, db) as base, labeler(browser, base, session, "ana") as page:
        assert page.locator("#fb-total").text_content() == "3"
        # Per key: the prompts finished after it, or None while the prompt has a reply left.
        for n, (key, done) in enumerate([("5", None), ("2", 1), ("4", None), ("1", 2),
                                         ("s", 3)]):
            assert page.locator(".fb-candidate h3").text_content() == f"Reply {n % 2 + 1} of 2"
            page.keyboard.press(key)
            if done is None:
                page.wait_for_selector(".fb-candidate h3:text-is('Reply 2 of 2')")
                ready(page)
            else:
                wait_done(page, done)
        page.wait_for_selector("#fb-finished")
        # Units (5,4), (2,2), (4,5), (1,1): alpha (interval) = 73/80, worked out above.
        alpha = page.locator("#fb-alpha")
        assert alpha.text_content() == f"{73 / 80:.3f}"
        assert float(alpha.get_attribute("data-value")) == pytest.approx(73 / 80)
        page.screenshot(path=str(tmp_path / "feedback-rate.png"), full_page=True)
        page.fill("#fb-name", "cy")  # someone else at the same computer
        page.click("#fb-name-save")
        page.wait_for_selector("#fb-labeler:text-is('cy')")
        assert page.locator("#fb-done").text_content() == "0"
        assert page.locator(".fb-candidate h3").text_content() == "Reply 1 of 2"
    got = answers(db, session)
    assert {key: value for key, value in got.items() if key[0] == "ana"} == {
        ("ana", 0, a): ("rating", 5), ("ana", 0, b): ("rating", 2),
        ("ana", 1, c): ("rating", 4), ("ana", 1, d): ("rating", 1),
        ("ana", 2, None): ("skip", None)}


def test_ranking_by_dragging_and_by_keyboard(browser, models, tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    session = make_session(db, "ranks", "rank", [["r1", "r2", "r3"], ["s1", "s2", "s3"]])
    (r1, r2, r3), (s1, s2, s3) = ids(db, session)
    with studio(models, db) as base, labeler(browser, base, session, "ana") as page:
        items = page.locator("#fb-rank li")
        assert [int(i) for i in items.evaluate_all("l => l.map(e => e.dataset.id)")] == \
            [r1, r2, r3]
        # Drag reply 3 onto the top half of reply 1: it goes first.
        page.locator(f"li[data-id='{r3}']").drag_to(
            page.locator(f"li[data-id='{r1}']"), target_position={"x": 40, "y": 5})
        assert page.locator("#fb-order").input_value() == f"{r3},{r1},{r2}"
        page.screenshot(path=str(tmp_path / "feedback-rank.png"), full_page=True)
        page.click("#fb-save")
        wait_done(page, 1)
        # Keyboard only: reply 3's up button, Enter twice; then reply 1's down button.
        up = page.locator(f"li[data-id='{s3}'] button.fb-up")
        up.focus()
        page.keyboard.press("Enter")
        page.keyboard.press("Enter")
        assert page.locator("#fb-order").input_value() == f"{s3},{s1},{s2}"
        page.locator(f"li[data-id='{s1}'] button.fb-down").focus()
        page.keyboard.press("Enter")
        assert page.locator("#fb-order").input_value() == f"{s3},{s2},{s1}"
        page.click("#fb-save")
        wait_done(page, 2)
        assert page.locator("#fb-finished").is_visible()
    assert answers(db, session) == {("ana", 0, None): ("ranking", [r3, r1, r2]),
                                    ("ana", 1, None): ("ranking", [s3, s2, s1])}
