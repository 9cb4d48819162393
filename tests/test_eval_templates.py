"""Task templates: applied to records, used the same way in training and at inference."""

from __future__ import annotations

import pytest
from eval_helpers import chat_ticket_records, ticket_records, write_splits
from helpers import write_jsonl

from tuneforge.config import ConfigError, TemplateConfig, load_config
from tuneforge.data.formats import load_examples
from tuneforge.data.render import IGNORE_INDEX, render_sft
from tuneforge.data.templates import (
    apply_template,
    check_template_roundtrip,
    prompt_and_reference,
    prompt_ids,
)
from tuneforge.errors import DataError
from tuneforge.models.tiny import CHATML_TEMPLATE, byte_tokenizer
from tuneforge.train.tasks import load_training_tasks

CHAT = TemplateConfig(system="Route the ticket.", user="Ticket: {text}", assistant="Team: {label}")
RAW = TemplateConfig(prompt="Ticket: {text}\nTeam:", completion=" {label}")


@pytest.fixture
def tickets(tmp_path):
    return load_examples(write_jsonl(tmp_path / "t.jsonl", ticket_records(3)))


def test_chat_template_rewrites_a_classification_record(tickets):
    ex = apply_template(tickets[0], CHAT)
    assert [(m.role, m.content) for m in ex.messages] == [
        ("system", "Route the ticket."), ("user", f"Ticket: {tickets[0].messages[0].content}"),
        ("assistant", "Team: billing")]
    assert ex.label == "billing" and ex.where == tickets[0].where
    assert apply_template(tickets[0], TemplateConfig()) is tickets[0]


def test_raw_template_makes_prompt_completion_text(tickets):
    ex = apply_template(tickets[1], RAW)
    assert ex.messages is None and ex.completion == " shipping"
    assert prompt_and_reference(ex) == (f"Ticket: {tickets[1].messages[0].content}\nTeam:", " shipping")


def test_template_errors_name_the_record_and_the_part(tickets, tmp_path):
    with pytest.raises(DataError, match=r"t\.jsonl:1: template\.user: no field \{subject\}"):
        apply_template(tickets[0], TemplateConfig(user="{subject}: {text}"))
    with pytest.raises(DataError, match="prompt and completion go together"):
        apply_template(tickets[0], TemplateConfig(prompt="{text}"))
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ex = load_examples(write_jsonl(tmp_path / "m.jsonl", [multi]))[0]
    with pytest.raises(DataError, match="single-turn"):
        apply_template(ex, TemplateConfig(user="Q: {input}"))
    assert apply_template(ex, TemplateConfig(system="Be brief.")).messages[0].content == "Be brief."


@pytest.mark.parametrize("template", [CHAT, RAW, TemplateConfig()], ids=["chat", "raw", "none"])
def test_inference_prompt_is_exactly_what_training_puts_before_the_answer(tickets, template):
    tok = byte_tokenizer()
    ex = apply_template(tickets[2], template)
    check_template_roundtrip(ex, tok)
    train = render_sft(ex, tok)
    ids = prompt_ids(prompt_and_reference(ex)[0], tok)
    assert train.input_ids[: len(ids)] == ids
    assert all(label == IGNORE_INDEX for label in train.labels[: len(ids)])
    assert train.labels[len(ids)] != IGNORE_INDEX


def test_roundtrip_check_catches_a_generation_prompt_that_training_never_sees(tickets):
    tok = byte_tokenizer()
    # a "thinking" template: the generation prompt opens a block the finished turn does not have
    opening = "'<|im_start|>assistant\n'"
    assert opening in CHATML_TEMPLATE
    tok.chat_template = CHATML_TEMPLATE.replace(opening, "'<|im_start|>assistant\n<think>\n'")
    with pytest.raises(DataError, match="training text and the inference prompt differ"):
        check_template_roundtrip(apply_template(tickets[0], CHAT), tok)


def test_training_renders_the_template_from_the_config(tmp_path):
    files = write_splits(tmp_path / "d", chat_ticket_records)
    config = load_config(None, [f"data.train={files['train']}", f"data.validation={files['validation']}",
                                "data.template.system=You are the router."])
    (task,) = load_training_tasks(config, byte_tokenizer())
    assert {ex.messages[0].content for ex in task.train + task.validation} == {"You are the router."}
    with pytest.raises(ConfigError, match="data.template.usr: unknown key; did you mean data.template.user"):
        load_config(None, ["data.train=x", "data.template.usr=hi"])
