"""Training data: the four JSONL formats, loss masks, truncation, packing, splits, bad lines (FILE:LINE)."""

from __future__ import annotations

import pytest

from qosora.errors import QosoraError
from qosora.train.data import IGNORE, BatchOrder, collate, encode, load_examples, pack, read_jsonl, split_holdout

from conftest import char_tokenizer, write_jsonl


def trained_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_text_trains_on_everything():
    tok = char_tokenizer()
    ex = encode({"text": "hello"}, tok)
    assert tok.decode(ex.input_ids) == "hello</s>"
    assert ex.labels == ex.input_ids


def test_prompt_completion_masks_the_prompt():
    tok = char_tokenizer()
    ex = encode({"prompt": "2+2=", "completion": "4"}, tok)
    assert tok.decode(ex.input_ids) == "2+2=4</s>"
    assert trained_text(tok, ex) == "4</s>"
    assert ex.labels[:4] == [IGNORE] * 4


def test_question_answer_renders_gsm8k_prompt():
    tok = char_tokenizer()
    ex = encode({"question": "what is 3*4?", "answer": "3*4=12\n#### 12"}, tok)
    assert tok.decode(ex.input_ids).startswith("Question: what is 3*4?\nAnswer: ")
    assert trained_text(tok, ex) == "3*4=12\n#### 12</s>"


def test_messages_train_only_assistant_turns():
    tok = char_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    ex = encode({"messages": msgs}, tok)
    assert tok.decode(ex.input_ids) == "<|system|>be brief</s><|user|>hi</s><|assistant|>yo</s><|user|>again</s><|assistant|>ok</s>"
    # Exactly the assistant contents and the tokens closing their turns carry a loss.
    assert trained_text(tok, ex) == "yo</s>ok</s>"


def test_messages_without_template_is_a_file_line_error(tmp_path):
    tok = char_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(QosoraError, match=r"chat\.jsonl:1: .*chat template"):
        load_examples(path, tok, 64)


@pytest.mark.parametrize("line, why", [
    ("{not json", "Expecting property name"),
    ('{"foo": 1}', "unknown record shape"),
    ('{"prompt": "a"}', "unknown record shape"),
    ('{"text": 3}', '"text" must be a string'),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
])
def test_bad_line_reports_file_and_line(tmp_path, line, why):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "", line])
    with pytest.raises(QosoraError) as e:
        read_jsonl(path)
    assert "d.jsonl:3: " in str(e.value) and why in str(e.value)


def test_truncation_and_empty_file(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdef", "completion": "ghij"}])
    (ex,) = load_examples(path, tok, seq_len=8)
    assert len(ex.input_ids) == len(ex.labels) == 8
    assert trained_text(tok, ex) == "gh"
    with pytest.raises(QosoraError, match="no records"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", []))


def test_packing_keeps_tokens_and_masks():
    tok = char_tokenizer()
    exs = [encode({"prompt": "ab", "completion": f"{i}"}, tok) for i in range(7)]
    rows = pack(exs, seq_len=5)
    assert all(len(r.input_ids) == 5 for r in rows[:-1])
    assert sum((r.input_ids for r in rows), []) == sum((e.input_ids for e in exs), [])
    assert sum((r.labels for r in rows), []) == sum((e.labels for e in exs), [])


def test_holdout_split_is_seeded_and_disjoint():
    tok = char_tokenizer()
    exs = [encode({"text": f"{i}"}, tok) for i in range(20)]
    a_train, a_eval = split_holdout(exs, 0.25, seed=1)
    b_train, b_eval = split_holdout(exs, 0.25, seed=1)
    assert len(a_eval) == 5 and len(a_train) == 15
    assert [e.input_ids for e in a_eval] == [e.input_ids for e in b_eval]
    assert {tuple(e.input_ids) for e in a_eval}.isdisjoint({tuple(e.input_ids) for e in a_train})
    with pytest.raises(QosoraError):
        split_holdout(exs, 1.0, seed=0)


def test_collate_pads_right_and_ignores_pads():
    tok = char_tokenizer()
    b = collate([encode({"text": "abc"}, tok), encode({"text": "a"}, tok)], pad_id=0)
    assert b.input_ids.shape == (2, 4)
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.labels[1, 2:].tolist() == [IGNORE, IGNORE]
    assert b.n_label_tokens == 3 + 1


def test_batch_order_two_ranks_equal_one_rank_with_double_accumulation():
    one = BatchOrder(50, batch_size=3, grad_accum=2, world_size=1, seed=5)
    two = BatchOrder(50, batch_size=3, grad_accum=1, world_size=2, seed=5)
    for step in range(20):  # crosses epoch boundaries
        assert one.micro_batches(step) == two.micro_batches(step)
        assert two.rank_micro_batches(step, 0) + two.rank_micro_batches(step, 1) == one.micro_batches(step)
    # Every epoch visits every example once.
    seen = sum((sum(one.micro_batches(s), []) for s in range(25)), [])
    assert sorted(seen[:50]) == list(range(50)) and sorted(seen[50:100]) == list(range(50))
