#!/usr/bin/env python3
"""Generate the feedback example datasets (stdlib only, seeded) into examples/data/feedback/.

Built on the Northwind Home support tickets of examples/data/support/ (made by
scripts/make_demo_data.py): the task is to route a ticket to one of six departments and reply
to the customer. Each ticket's reference reply is the good response; worse responses are made
from it with one flaw each, and a fixed rubric orders them (worst first):

    1  wrong department   the reply is fine, the routing is not (a confusable department)
    2  rude               the same help, wrapped in a snide opener or closer
    3  no next step       polite, but vague: nothing the customer can act on
    4  rambling           the right help buried in filler sentences
    5  good               right department, polite, concise, a concrete next step

Files (train from the support train tickets, test from the support test tickets, so no
ticket is in both):

    pairs_{train,test}.jsonl      preference: prompt, chosen, rejected
    rankings_{train,test}.jsonl   ranking: prompt, responses (3-4, best first)
    ratings_{train,test}.jsonl    rating: prompt, response, rating 1-5 (two per ticket; 10% off by one)
    unpaired_{train,test}.jsonl   unpaired (KTO): prompt, completion, label true/false
    arithmetic_{train,test}.jsonl prompts for PPO/GRPO: word problems with their answer
    replies_{train,test}.jsonl    prompts for PPO/GRPO: tickets with their department

Usage:
    python scripts/make_feedback_data.py                # seed 0, writes examples/data/feedback/
    python scripts/make_feedback_data.py --seed 1 --out /tmp/feedback

Same seed -> byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "examples" / "data" / "support"

SYSTEM = (
    "You are Northwind Home's support assistant. Route the ticket to one department (Billing, "
    "Technical Support, Shipping, Returns, Account Security, Sales) and answer as "
    "'Department: <name>' then 'Reply: <a short, polite reply with the next step>'."
)
DEPARTMENTS = ["Billing", "Technical Support", "Shipping", "Returns", "Account Security", "Sales"]
# The departments a ticket is most easily misrouted to (the demo data's routing rules).
CONFUSABLE = {
    "Billing": ["Returns", "Account Security", "Shipping"],
    "Technical Support": ["Account Security", "Returns"],
    "Shipping": ["Returns", "Billing"],
    "Returns": ["Billing", "Shipping", "Technical Support"],
    "Account Security": ["Technical Support", "Billing"],
    "Sales": ["Shipping", "Billing", "Technical Support"],
}
FLAWS = ["wrong_department", "rude", "no_next_step", "rambling"]
SCORE = {"wrong_department": 1, "rude": 2, "no_next_step": 3, "rambling": 4, "good": 5}

# Each pool: phrases seen in train and test, then phrases held out for test only, so the test
# split also asks whether a model learnt "rude" rather than these exact words.
RUDE_OPENERS = (
    ["Obviously,", "As anyone could tell,", "Look,", "Fine, if you must know:",
     "We get this question constantly.", "Try reading the website first.",
     "Not sure why this needs a ticket, but", "Calm down."],
    ["Honestly, this is basic.", "Sigh."],
)
RUDE_CLOSERS = (
    ["Don't write in about this again.", "Please don't waste our time next time.",
     "It's really not that hard.", "We have better things to do."],
    ["Figure it out yourself next time."],
)
VAGUE = (
    ["Thanks for your message.", "We have received your ticket.",
     "Thank you for contacting Northwind Home.", "We understand how frustrating this can be.",
     "Thanks for letting us know about this.", "We appreciate your patience.",
     "Your feedback matters to us.", "We're sorry to hear about this situation."],
    ["Noted, thank you for writing.", "We hear you."],
)
VAGUE_ENDINGS = (
    ["Have a great day!", "Thanks again for shopping with us.", "We value your business.",
     "Someone may look into it."],
    ["Best wishes from all of us."],
)
FILLER = (
    ["At Northwind Home we believe every home deserves care and attention to detail.",
     "Our team has worked hard for many years to build a store our customers love.",
     "We are always looking for new ways to improve the experience for all of our customers.",
     "Please know that your satisfaction is very important to us, today and every day.",
     "We truly appreciate you taking the time to write to us about this matter.",
     "Customer service has always been at the very heart of everything we do here.",
     "As you may know, we offer a wide range of furniture, textiles, kitchenware and more.",
     "We hope you are having a wonderful week and enjoying your Northwind products.",
     "Every message we receive is read carefully by a real member of our team."],
    ["Our founders started Northwind Home with a simple idea about comfortable living.",
     "We also post seasonal decorating ideas on our blog, which many customers enjoy."],
)

# Arithmetic word problems: (template, answer); items are plural nouns.
ITEMS = ["mugs", "cushion covers", "bath mats", "SmartBulbs", "candles", "dinner plates",
         "towels", "storage jars", "planters", "SmartPlugs", "throw blankets", "cutting boards"]
ARITHMETIC_SUFFIX = " Give the result on the last line as 'Answer: <number>'."


def load_tickets(split: str) -> list[dict]:
    """The support tickets of a split: ticket text, department, reference reply."""
    out = []
    for line in (SUPPORT / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        head, reply = messages[2]["content"].split("\nReply: ", 1)
        out.append({"ticket": messages[1]["content"],
                    "department": head.removeprefix("Department: "), "reply": reply})
    return out


def pool(pools: tuple[list[str], list[str]], split: str) -> list[str]:
    shared, held_out = pools
    return shared + held_out if split == "test" else shared


def respond(department: str, reply: str) -> str:
    return f"Department: {department}\nReply: {reply}"


def lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if text[:2] != text[:2].upper() else text


def flawed(rng: Random, ticket: dict, flaw: str, split: str) -> str:
    """The ticket's reference reply with one flaw."""
    dept, reply = ticket["department"], ticket["reply"]
    if flaw == "good":
        return respond(dept, reply)
    if flaw == "wrong_department":
        return respond(rng.choice(CONFUSABLE[dept]), reply)
    if flaw == "rude":
        opener, closer = rng.choice(pool(RUDE_OPENERS, split)), rng.choice(pool(RUDE_CLOSERS, split))
        style = rng.randrange(3)  # opener, closer, or both
        text = f"{opener} {lower_first(reply)}" if style != 1 else reply
        return respond(dept, f"{text} {closer}" if style != 0 else text)
    if flaw == "no_next_step":
        first, last = rng.choice(pool(VAGUE, split)), rng.choice(pool(VAGUE_ENDINGS, split))
        return respond(dept, f"{first} {last}")
    if flaw == "rambling":
        filler = rng.sample(pool(FILLER, split), 4)
        return respond(dept, " ".join([*filler[:2], reply, *filler[2:]]))
    raise ValueError(flaw)


def prompt(ticket: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket["ticket"]}]


# ----------------------------------------------------------------------------- the datasets


def pairs(rng: Random, tickets: list[dict], n: int, split: str) -> list[dict]:
    """Good against each flaw in turn; one pair in five between two flawed responses."""
    out = []
    for i, ticket in enumerate(rng.sample(tickets, n)):
        if i % 5 == 4:
            a, b = sorted(rng.sample(FLAWS, 2), key=lambda f: -SCORE[f])
        else:
            a, b = "good", FLAWS[(i - i // 5) % 4]  # the i-th good pair: each flaw in turn
        out.append({"prompt": prompt(ticket), "chosen": flawed(rng, ticket, a, split),
                    "rejected": flawed(rng, ticket, b, split), "flaws": [a, b]})
    return out


def rankings(rng: Random, tickets: list[dict], n: int, split: str) -> list[dict]:
    """3 or 4 responses of distinct quality, best first (the good one is in most)."""
    out = []
    for ticket in rng.sample(tickets, n):
        kinds = rng.sample(["good", *FLAWS], rng.choice([3, 4]))
        kinds.sort(key=lambda f: -SCORE[f])
        out.append({"prompt": prompt(ticket),
                    "responses": [flawed(rng, ticket, k, split) for k in kinds], "flaws": kinds})
    return out


def ratings(rng: Random, tickets: list[dict], n: int, split: str) -> list[dict]:
    """Two responses per ticket of different quality, so ratings also compare within a
    prompt; rated 1-5 by the rubric, one in ten off by one, as people disagree."""
    out = []
    for ticket in rng.sample(tickets, n // 2):
        first = "good" if rng.random() < 0.5 else rng.choice(FLAWS)
        second = rng.choice([f for f in FLAWS if f != first])
        for kind in (first, second):
            rating = SCORE[kind]
            if rng.random() < 0.1:
                rating = min(5, max(1, rating + rng.choice([-1, 1])))
            out.append({"prompt": prompt(ticket), "response": flawed(rng, ticket, kind, split),
                        "rating": rating, "flaw": kind})
    rng.shuffle(out)
    return out


def unpaired(rng: Random, tickets: list[dict], n: int, split: str) -> list[dict]:
    """Half thumbs up (good responses), half thumbs down (one flaw each)."""
    out = []
    for i in range(n):
        ticket = tickets[(i // 2) % len(tickets)]
        kind = "good" if i % 2 == 0 else FLAWS[(i // 2) % 4]
        out.append({"prompt": prompt(ticket), "completion": flawed(rng, ticket, kind, split),
                    "label": kind == "good", "flaw": kind})
    rng.shuffle(out)
    return out


def word_problem(rng: Random) -> tuple[str, int]:
    item, n, m = rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 12)
    price, extra, pct = rng.randint(3, 60), rng.randint(2, 15), rng.choice([10, 20, 30, 50])
    text, answer = rng.choice([
        (f"A customer buys {n} {item} at ${price} each. How much do they pay in total?", n * price),
        (f"An order of {n} {item} costs ${n * price}. How much does one cost?", price),
        (f"A customer pays ${price} for {item} and ${extra} for shipping. What is the total?",
         price + extra),
        (f"A set of {item} costs ${price + extra} and is on sale for ${extra} off. "
         "What is the sale price?", price),
        (f"The warehouse has {n * m + extra} {item} and ships {extra} of them. How many are left?",
         n * m),
        (f"{n} customers each return {m} {item}. How many {item} come back in total?", n * m),
        (f"A box holds {m} {item}. How many boxes does an order of {n * m} {item} fill?", n),
        (f"A customer buys {n} {item} at ${price} each and pays ${extra} for shipping. "
         "What is the total?", n * price + extra),
        (f"A ${price * 10} rug has a {pct}% discount. How many dollars is the discount?",
         price * pct // 10),
    ])
    return text + ARITHMETIC_SUFFIX, answer


def arithmetic(rng: Random, n: int, taken: set[str]) -> list[dict]:
    out = []
    while len(out) < n:
        text, answer = word_problem(rng)
        if text not in taken:
            taken.add(text)
            out.append({"prompt": text, "answer": answer})
    return out


def replies(rng: Random, tickets: list[dict], n: int) -> list[dict]:
    return [{"prompt": prompt(t), "department": t["department"], "min_words": 8,
             "max_words": 40} for t in rng.sample(tickets, n)]


# ------------------------------------------------------------------------------- checks, io


def check(files: dict[str, list[dict]]) -> None:
    """No ticket (or problem) both in a train file and in its test file; no repeated record."""
    for name in {key.rsplit("_", 1)[0] for key in files}:
        train, test = files[f"{name}_train"], files[f"{name}_test"]
        key = lambda r: json.dumps(r["prompt"])  # noqa: E731
        overlap = {key(r) for r in train} & {key(r) for r in test}
        assert not overlap, f"{name}: {len(overlap)} prompts in both train and test"
        for split, rows in (("train", train), ("test", test)):
            dumped = [json.dumps(r, sort_keys=True) for r in rows]
            assert len(dumped) == len(set(dumped)), f"{name}_{split}: repeated records"


def write(out: Path, files: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def readme(files: dict[str, list[dict]], seed: int) -> str:
    counts = "\n".join(
        f"| `{name}` | {len(files[name + '_train'])} | {len(files[name + '_test'])} | {what} |"
        for name, what in (
            ("pairs", "preference: `prompt`, `chosen`, `rejected` (+ `flaws`)"),
            ("rankings", "ranking: `prompt`, `responses` best first, 3-4 (+ `flaws`)"),
            ("ratings", "rating: `prompt`, `response`, `rating` 1-5 (+ `flaw`)"),
            ("unpaired", "unpaired (KTO): `prompt`, `completion`, `label` (+ `flaw`)"),
            ("arithmetic", "prompts: `prompt`, `answer` (rewards `arithmetic`, `answer_format`)"),
            ("replies", "prompts: `prompt`, `department`, `min_words`, `max_words` "
             "(rewards `support_reply`, `length`)"),
        )
    )
    rubric = "\n".join(f"{SCORE[k]}. {k.replace('_', ' ')}" for k in sorted(SCORE, key=SCORE.get))
    return f"""# Feedback examples: Northwind Home support replies

Learning from feedback on the support task of `examples/data/support/`: route a customer's
ticket to one of six departments and reply. Every prompt is a system message (the format
asked for) plus the ticket; each ticket's reference reply is the good response, and worse
responses are made from it with one flaw each. One rubric orders them, worst first:

{rubric}

(wrong department: the reply is fine but the ticket goes to a confusable department; rude: the
same help with a snide opener or closer; no next step: polite but vague; rambling: the right
help buried in filler). Some rude, vague and filler phrases appear only in the test files, so
a test score also asks whether a model learnt the quality, not the words.

| file | train | test | records |
|---|---:|---:|---|
{counts}

The train files use the support data's train tickets and the test files its test tickets: no
ticket, and no arithmetic problem, is in both (the generator asserts it). Ratings follow the
rubric, with one in ten off by one as annotators disagree; each ticket has two rated
responses of different kinds, and each unpaired ticket one thumbs up and one thumbs down.
`flaw`/`flaws` name the kind of each response, for per-flaw analysis; training ignores them.

For PPO/GRPO, `arithmetic_*` are word problems that ask for `Answer: <number>` on the last
line, checked against `answer`; `replies_*` are tickets with their `department`, scored by
the `support_reply` reward (format + department) and `length` (8-40 words). See
`tuneforge/rewards.py`.

## Regenerate

```bash
python scripts/make_feedback_data.py          # seed {seed}, writes this folder (byte-identical)
```
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "data" / "feedback")
    args = p.parse_args(argv)
    rng = Random(args.seed)
    train, test = load_tickets("train"), load_tickets("test")
    taken: set[str] = set()
    files = {
        "pairs_train": pairs(rng, train, 300, "train"),
        "pairs_test": pairs(rng, test, 100, "test"),
        "rankings_train": rankings(rng, train, 200, "train"),
        "rankings_test": rankings(rng, test, 60, "test"),
        "ratings_train": ratings(rng, train, 400, "train"),
        "ratings_test": ratings(rng, test, 120, "test"),
        "unpaired_train": unpaired(rng, train, 400, "train"),
        "unpaired_test": unpaired(rng, test, 120, "test"),
        "arithmetic_train": arithmetic(rng, 200, taken),
        "arithmetic_test": arithmetic(rng, 50, taken),
        "replies_train": replies(rng, train, 200),
        "replies_test": replies(rng, test, 60),
    }
    check(files)
    write(args.out, files)
    (args.out / "README.md").write_text(readme(files, args.seed), encoding="utf-8")
    for name, rows in files.items():
        print(f"{name}: {len(rows)} records")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
