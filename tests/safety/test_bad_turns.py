"""Turn values that are not text, and empty answers, are skipped with a reason instead of being
stringified ("None", "{...}") or trained as a bare end-of-turn token."""

from __future__ import annotations

import pytest

from llava_ndino.data.conversation import SampleError, parse_sample


@pytest.mark.parametrize("value", [None, 42, {"text": "ciao"}, ["ciao"], True])
def test_a_non_text_llava_turn_is_a_bad_turn_value(value) -> None:
    sample = {
        "id": "s1",
        "conversations": [{"from": "human", "value": "Ciao?"}, {"from": "gpt", "value": value}],
    }
    with pytest.raises(SampleError, match="'s1'.*turn 1 'value' must be text") as caught:
        parse_sample(sample)
    assert caught.value.reason == "bad_turn_value"


@pytest.mark.parametrize("content", [None, 3.5, {"type": "text"}])
def test_a_non_text_message_content_is_a_bad_turn_value(content) -> None:
    sample = {
        "id": "s2",
        "messages": [{"role": "user", "content": "Ciao?"}, {"role": "assistant", "content": content}],
    }
    with pytest.raises(SampleError) as caught:
        parse_sample(sample)
    assert caught.value.reason == "bad_turn_value"


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_an_empty_answer_is_skipped(answer: str) -> None:
    sample = {
        "id": "s3",
        "conversations": [{"from": "human", "value": "Ciao?"}, {"from": "gpt", "value": answer}],
    }
    with pytest.raises(SampleError, match="assistant turn is empty") as caught:
        parse_sample(sample)
    assert caught.value.reason == "empty_answer"


def test_a_good_sample_still_parses() -> None:
    sample = {
        "id": "ok",
        "conversations": [{"from": "human", "value": "Ciao?"}, {"from": "gpt", "value": "Ciao!"}],
    }
    assert [m.content for m in parse_sample(sample).messages] == ["Ciao?", "Ciao!"]
