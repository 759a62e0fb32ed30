"""Turn values that are not text, and empty answers, are skipped with a reason instead of being
stringified ("None", "{...}") or trained as a bare end-of-turn token."""

from __future__ import annotations

import pytest

from llava_ndino.data.conversation import SampleError, parse_sample


def _llava(answer: object) -> dict:
    return {
        "id": "s1",
        "conversations": [{"from": "human", "value": "Ciao?"}, {"from": "gpt", "value": answer}],
    }


def _openai(content: object) -> dict:
    return {
        "id": "s2",
        "messages": [{"role": "user", "content": "Ciao?"}, {"role": "assistant", "content": content}],
    }


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        *[(_llava(value), "bad_turn_value") for value in (None, 42, {"text": "ciao"}, ["ciao"], True)],
        *[(_openai(content), "bad_turn_value") for content in (None, 3.5, {"type": "text"})],
        *[(_llava(answer), "empty_answer") for answer in ("", "   ", "\n\t")],
    ],
)
def test_a_bad_turn_is_skipped_with_its_reason(sample: dict, reason: str) -> None:
    with pytest.raises(SampleError, match=f"'{sample['id']}'") as caught:
        parse_sample(sample)
    assert caught.value.reason == reason


def test_a_good_sample_still_parses() -> None:
    sample = {
        "id": "ok",
        "conversations": [{"from": "human", "value": "Ciao?"}, {"from": "gpt", "value": "Ciao!"}],
    }
    assert [m.content for m in parse_sample(sample).messages] == ["Ciao?", "Ciao!"]
