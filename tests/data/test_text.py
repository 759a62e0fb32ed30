"""Text data for the LLaMAntino recipes (``data.text``): loss masks against decoded text, instruction
and preference rows, packing with and without document isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_ndino.data.dataset import Collator, EncodedDataset, JsonRecords, Skipped
from llava_ndino.data.encode import IGNORE_INDEX
from llava_ndino.data.packing import model_inputs
from llava_ndino.data.text import (
    PackedCollator,
    PackedText,
    PreferenceCollator,
    PreferenceEncoder,
    SftEncoder,
    text_conversation,
)
from llava_ndino.formats.prompts import get_template
from llava_ndino.model.peft_setup import prepare_tokenizer
from tests.helpers import LEGAL_CHAT, TEXT_TEMPLATES


@pytest.mark.parametrize("name", TEXT_TEMPLATES)
def test_sft_labels_are_exactly_the_answers_and_stop_token(text_tokenizers, name: str) -> None:
    tokenizer = text_tokenizers[name]
    encoder = SftEncoder(tokenizer, get_template(name), max_length=1024)
    sample = encoder.encode({"messages": LEGAL_CHAT}, 0)
    labelled = sample.labels[sample.labels != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    stop = get_template(name).stop_token
    pad = " " if name == "llama2-it-chat" else ""  # LLaMA-2 puts a space on both sides of an answer
    expected = [f"{pad}Un atto del governo.{pad}", f"{pad}Un atto del parlamento.{pad}", ""]
    assert text.replace(stop, "|").split("|") == expected


def test_instruction_rows_become_messages_and_bad_rows_are_skipped(text_tokenizers, tmp_path: Path) -> None:
    conversation = text_conversation(
        {"instruction": "Riassumi.", "input": "Testo lungo", "output": "Breve"}, 3
    )
    assert [m.role for m in conversation.messages] == ["user", "user", "assistant"]
    assert conversation.sample_id == "#3"
    assert len(text_conversation({"instruction": "Saluta.", "input": "", "output": "Ciao"}, 0).messages) == 2
    rows = [
        {"instruction": "Saluta.", "output": "Ciao"},
        {"instruction": "", "output": "x"},
        {"messages": [{"role": "user", "content": "solo domanda"}]},
        {"id": "img", "image": "a.png", "messages": [{"role": "user", "content": "<image>\nCosa?"}]},
        {"foo": 1},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = EncodedDataset(
        JsonRecords(path), SftEncoder(text_tokenizers["alpaca-it"], get_template("alpaca-it"), 512)
    )
    items = [dataset[i] for i in range(len(rows))]
    assert not isinstance(items[0], Skipped)
    assert [i.reason for i in items[1:]] == ["malformed", "no_assistant", "no_assistant", "malformed"]


@pytest.fixture(scope="module")
def script_tokenizer(tiny_dirs):
    """The tiny LLaMA-3-style tokenizer prepared for llama3-anita-script."""
    return prepare_tokenizer(tiny_dirs["llm"], get_template("llama3-anita-script"))


def test_anita_script_template_labels_the_answers_and_their_eot(script_tokenizer) -> None:
    encoder = SftEncoder(script_tokenizer, get_template("llama3-anita-script"), max_length=1024)
    sample = encoder.encode({"messages": LEGAL_CHAT}, 0)
    text = script_tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])
    assert text == "Un atto del governo. <|eot_id|>Un atto del parlamento. <|eot_id|>"


@pytest.mark.parametrize("name", [*TEXT_TEMPLATES, "llama3-anita-script"])
def test_train_on_all_labels_every_token_of_the_rendered_text(
    text_tokenizers, script_tokenizer, name
) -> None:
    """data.train_on=all: what marcopoli/LLaMAntino-3-ANITA finetune_llama3.py trains (SFTTrainer on a
    plain "text" field, no completion-only collator): every token, the prompt and its markers included."""
    tokenizer = script_tokenizer if name == "llama3-anita-script" else text_tokenizers[name]
    template = get_template(name)
    row = {"instruction": "Riassumi.", "input": "Un testo lungo.", "output": "Breve."}
    sample = SftEncoder(tokenizer, template, max_length=1024, train_on="all").encode(row, 0)
    assert sample.labels.tolist() == sample.input_ids.tolist()
    rendered = "".join(s.text for s in template.render(text_conversation(row, 0).messages))
    assert sample.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_only = SftEncoder(tokenizer, template, max_length=1024).encode(row, 0)
    assert answer_only.input_ids.tolist() == sample.input_ids.tolist()
    assert 0 < int((answer_only.labels != IGNORE_INDEX).sum()) < len(sample.labels)


def test_train_on_all_is_cut_to_max_length_and_padding_carries_no_loss(text_tokenizers) -> None:
    tokenizer, template = text_tokenizers["llama3"], get_template("llama3")
    row = {"instruction": "Ciao", "output": "Ciao"}
    limit = len(SftEncoder(tokenizer, template, 1024, train_on="all").encode(row, 0).input_ids) + 4
    encoder = SftEncoder(tokenizer, template, max_length=limit, train_on="all")
    short, long = encoder.encode(row, 0), encoder.encode({"messages": LEGAL_CHAT}, 1)
    assert len(long.input_ids) == limit and (long.labels == long.input_ids).all()
    batch = Collator(tokenizer.pad_token_id)([short, long]).tensors
    padded = batch["attention_mask"] == 0
    assert int(padded.sum()) == 4 and (batch["labels"][padded] == IGNORE_INDEX).all()
    assert (batch["labels"][~padded] != IGNORE_INDEX).all()


def test_train_on_rejects_unknown_values(text_tokenizers) -> None:
    with pytest.raises(ValueError, match="assistant, all"):
        SftEncoder(text_tokenizers["llama3"], get_template("llama3"), 64, train_on="prompt")


def test_preference_rows_as_strings_and_as_conversations_encode_alike(text_tokenizers) -> None:
    tokenizer = text_tokenizers["llama3"]
    encoder = PreferenceEncoder(tokenizer, get_template("llama3"), max_length=256, max_prompt_length=64)
    user = {"role": "user", "content": "Scrivi una frase."}
    as_strings = encoder.encode({"prompt": "Scrivi una frase.", "chosen": "Sì.", "rejected": "No."}, 0)
    as_lists = encoder.encode(
        {
            "prompt": "Scrivi una frase.",
            "chosen": [user, {"role": "assistant", "content": "Sì."}],
            "rejected": [user, {"role": "assistant", "content": "No."}],
        },
        1,
    )
    for a, b in ((as_strings.chosen, as_lists.chosen), (as_strings.rejected, as_lists.rejected)):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    answer = as_strings.chosen.labels[as_strings.chosen.labels != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Sì.<|eot_id|>"
    batch = PreferenceCollator(tokenizer.pad_token_id)([as_strings, as_lists]).tensors
    assert batch["input_ids"].shape[0] == 4
    assert torch.equal(batch["labels"][0, : as_strings.chosen.labels.numel()], as_strings.chosen.labels)
    assert torch.equal(batch["labels"][2, : as_strings.rejected.labels.numel()], as_strings.rejected.labels)
    mismatch = {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": "b"}
    with pytest.raises(ValueError, match="different conversations"):
        encoder.encode(mismatch, 2)


def test_long_prompts_keep_their_last_tokens(text_tokenizers) -> None:
    tokenizer = text_tokenizers["llama3"]
    encoder = PreferenceEncoder(tokenizer, get_template("llama3"), max_length=40, max_prompt_length=8)
    pair = encoder.encode({"prompt": "parola " * 100, "chosen": "Sì.", "rejected": "No."}, 0)
    first_answer = int((pair.chosen.labels != IGNORE_INDEX).nonzero()[0])
    assert first_answer == 8
    assert tokenizer.decode(pair.chosen.input_ids[first_answer:]) == "Sì.<|eot_id|>"


def _packed(tokenizer, texts: list, block: int) -> PackedText:
    return PackedText([{"text": t} if isinstance(t, str) else t for t in texts], tokenizer, block)


def test_packing_joins_documents_with_eos_and_lists_bad_rows(text_tokenizers) -> None:
    tokenizer = text_tokenizers["llama3"]
    texts = ["Il gatto dorme.", {"id": "vuoto", "text": "  "}, "La casa è grande.", "Roma è bella."]
    packed = _packed(tokenizer, texts, block=8)
    stream = packed.tokens.tolist()
    assert stream.count(tokenizer.eos_token_id) == 3 and stream.count(tokenizer.bos_token_id) == 3
    assert len(packed) == len(stream) // 8
    skipped = [s for i in range(len(packed)) for s in packed[i].skipped]
    assert [(s.sample_id, s.reason) for s in skipped] == [("vuoto", "no_text")]
    batch = PackedCollator(isolate=False)([packed[0], packed[1]])
    assert batch.tensors["input_ids"].shape == (2, 8) and "position_ids" not in batch.tensors
    assert torch.equal(batch.tensors["labels"], batch.tensors["input_ids"])
    with pytest.raises(ValueError, match="fewer than one block"):
        _packed(tokenizer, ["corto"], block=512)


def test_isolated_packing_equals_separate_documents(tiny_dirs, text_tokenizers) -> None:
    """With isolation, each document in a packed block gets the logits it gets alone."""
    tokenizer = text_tokenizers["llama3"]
    docs = ["Il gatto dorme sul divano.", "La pizza di Napoli è buona.", "Il treno parte alle otto."]
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs]
    packed = _packed(tokenizer, docs, block=sum(lengths))
    batch = PackedCollator(isolate=True)([packed[0]]).tensors
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["labels"][0, starts[1:]].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"]).eval()
    with torch.no_grad():
        together = model(**model_inputs(batch), use_cache=False).logits[0]
        crossing = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        crossing = crossing.logits[0]
        for start, n in zip(starts, lengths, strict=True):
            alone = model(input_ids=batch["input_ids"][:, start : start + n]).logits[0]
            torch.testing.assert_close(together[start : start + n], alone, rtol=1e-4, atol=1e-4)
    last = starts[2]
    assert not torch.allclose(
        crossing[last : last + lengths[2]], together[last : last + lengths[2]], atol=1e-4
    )
