"""Text recipes end to end on a tiny LLaMA: every shipped recipe trains 2 steps from the command line,
exports load in plain transformers/peft with equal logits, LoRA/QLoRA runs resume exactly, and the
clm and dpo objectives measurably learn."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ndino.cli import main
from llava_ndino.config import load_config
from llava_ndino.data.dataset import read_records
from llava_ndino.data.text import PackedCollator, PackedText
from llava_ndino.formats.run_dir import latest_checkpoint, load_model_weights
from llava_ndino.synthetic.text_samples import write_text_samples
from llava_ndino.train.loop import train
from llava_ndino.train.tasks.registry import make_task

# every text recipe (tests/config/test_recipes.py checks that none is missing) -> the sample
# file its data format needs
RECIPES = {
    "llamantino2_adapt": "text",
    "llamantino2_dolly": "instructions",
    "llamantino2_evalita": "instructions",
    "llamantino2_ultrachat": "chat",
    "anita_sft": "instructions",
    "anita_dpo": "preferences",
    "anita_adapt": "text",
    "legal_cpt": "text",
}
# small and fast: what the export, resume and learning tests add to a recipe
SMALL = [
    "model.dtype=float32",
    "data.max_length=64",
    "train.per_device_batch_size=4",
    "train.grad_accum=1",
    "train.log_every=1",
    "lora.r=4",
]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic Italian sets in every text format."""
    torch.set_num_threads(2)
    return write_text_samples(tmp_path_factory.mktemp("text"))


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last logged record of each step."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# at their shipped sizes (QLoRA on CPU, batch 8 x 12, blocks of 2048) these take over 20 s on 2 cores
HEAVY = {"anita_dpo", "legal_cpt", "anita_sft"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in RECIPES]
)
def test_text_recipe_trains_two_steps_from_the_command_line(
    tiny_dirs, text_data, tmp_path: Path, name: str
) -> None:
    run_dir = tmp_path / name
    args = [f"recipe={name}", f"model.llm={tiny_dirs['llm']}", f"data.path={text_data[RECIPES[name]]}"]
    # in this process always engine=single: DeepSpeed ZeRO-3 patches torch process-wide; the full
    # fine-tune recipes' own zero3 runs under torchrun in tests/distributed/test_engines.py
    assert main(["train", *args, "engine=single", "train.max_steps=2", f"output_dir={run_dir}"]) == 0
    last = _metrics(run_dir)[2]
    assert math.isfinite(last["loss"]) and last["loss"] > 0 and last["tokens_per_s"] > 0
    assert {"step", "lr", "grad_norm", "samples_per_s", "step_s", "pad_fraction"} <= last.keys()
    assert last["step_s"] > 0 and "mem_peak_gib" not in last, "memory is logged on CUDA only"
    assert 0 < last["logit_fraction"] <= 1
    state = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    if load_config([f"recipe={name}", "train.max_steps=1"]).lora.enabled:
        assert state and all("lora_" in key for key in state), "adapter runs store only the adapters"
    if RECIPES[name] == "preferences":
        assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= last.keys()


@pytest.mark.parametrize(("recipe", "extra"), [("legal_cpt", []), ("anita_sft", ["data.template=llama3"])])
def test_merged_export_and_adapter_give_equal_logits(
    tiny_dirs, text_data, tmp_path: Path, recipe, extra
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir = tmp_path / "run"
    data = text_data[RECIPES[recipe]]
    args = [f"recipe={recipe}", f"model.llm={tiny_dirs['llm']}", f"data.path={data}", *SMALL, *extra]
    train(load_config([*args, "train.max_steps=3", "train.lr=1e-2", f"output_dir={run_dir}"]))
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(merged)]) == 0
    assert main(["export", str(run_dir), "--adapter", "--out", str(adapter)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.chat_template
    stop = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop in GenerationConfig.from_pretrained(merged).eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Che cosa fa il gatto?"}], tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"], dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        from_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    assert (with_adapter - before).abs().max() > 1e-3, "the trained adapter changes the model"
    torch.testing.assert_close(from_merged, with_adapter, rtol=0, atol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_adapter_runs_resume_exactly(tiny_dirs, text_data, tmp_path: Path, quantize: str) -> None:
    args = [
        "recipe=legal_cpt",
        f"model.llm={tiny_dirs['llm']}",
        f"data.path={text_data['text']}",
        *SMALL,
        f"lora.quantize={quantize}",
        "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must resume too
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_last=0",
        "train.lr=5e-3",
    ]
    straight = tmp_path / "straight"
    train(load_config([*args, f"output_dir={straight}"]))
    resumed = tmp_path / "resumed"  # as if killed after step 2: its checkpoint and metrics so far
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    (resumed / "checkpoints" / "latest").write_text("step_2\n")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    result = train(load_config([*args, f"output_dir={resumed}"]))
    assert result.step == 4
    expected, got = _metrics(straight), _metrics(resumed)
    for step in (3, 4):
        assert abs(expected[step]["loss"] - got[step]["loss"]) <= 1e-6, step
    final_a = load_file(str(straight / "checkpoints" / "step_4" / "model.safetensors"))
    final_b = load_file(str(resumed / "checkpoints" / "step_4" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=1e-6, msg=key)


def _heldout_perplexity(task, path: Path) -> float:
    """Perplexity of the task's model on the packed held-out documents."""
    dataset = PackedText(read_records(path), task.tokenizer, task.cfg.data.max_length)
    batch = PackedCollator(isolate=False)([dataset[i] for i in range(len(dataset))]).tensors
    task.model.eval()
    with torch.no_grad():
        loss_sum, _ = task.loss_sum(task.model, batch)
    return math.exp(float(loss_sum) / task.targets(batch))


CLM_PERPLEXITY_FACTOR = 20


def test_clm_cuts_heldout_perplexity(tiny_dirs, text_data, tmp_path: Path) -> None:
    """Full fine-tuning of the random tiny LLaMA for 40 steps on the Italian documents must divide the
    perplexity of unseen documents by at least 20 (measured: about 1055 -> 10)."""
    cfg = load_config(
        [
            "recipe=legal_cpt",
            f"model.llm={tiny_dirs['llm']}",
            f"data.path={text_data['text']}",
            *[item for item in SMALL if not item.startswith("lora.")],  # full fine-tuning: no adapter keys
            "lora.enabled=false",
            "train.per_device_batch_size=8",
            "train.gradient_checkpointing=false",
            "train.max_steps=40",
            "train.save_every=40",
            "train.lr=5e-3",
            "train.warmup_ratio=0.05",
            f"output_dir={tmp_path / 'clm'}",
        ]
    )
    task = make_task(cfg)
    task.build()
    before = _heldout_perplexity(task, text_data["heldout"])
    train(cfg)
    task.load_state(load_model_weights(latest_checkpoint(tmp_path / "clm")))
    after = _heldout_perplexity(task, text_data["heldout"])
    print(f"held-out perplexity {before:.1f} -> {after:.2f}")
    assert after * CLM_PERPLEXITY_FACTOR < before


def test_dpo_raises_reward_accuracy_and_margin(tiny_dirs, text_data, tmp_path: Path) -> None:
    """LoRA DPO on grammatical (chosen) vs scrambled (rejected) answers: accuracy and margin grow."""
    run_dir = tmp_path / "dpo"
    cfg = load_config(
        [
            "recipe=anita_dpo",
            f"model.llm={tiny_dirs['llm']}",
            f"data.path={text_data['preferences']}",
            *SMALL,
            "data.template=llama3",
            "data.max_length=128",
            "lora.quantize=none",
            "lora.r=8",
            "train.per_device_batch_size=8",
            "train.optimizer=adamw",
            "train.gradient_checkpointing=false",
            "train.max_steps=20",
            "train.save_every=20",
            "train.log_every=5",
            "train.lr=2e-3",
            f"output_dir={run_dir}",
        ]
    )
    train(cfg)
    logged = _metrics(run_dir)
    first, last = logged[5], logged[20]
    print({step: (r["reward_accuracy"], r["reward_margin"]) for step, r in logged.items()})
    assert last["reward_accuracy"] > 0.5 and last["reward_accuracy"] > first["reward_accuracy"]
    assert last["reward_margin"] > 2 * max(first["reward_margin"], 0.01)
    assert last["loss"] < math.log(2)


def test_save_last_false_trains_without_writing_a_checkpoint(tiny_dirs, text_data, tmp_path: Path) -> None:
    """Benchmarks and dry runs switch the final checkpoint off; metrics are still logged."""
    run_dir = tmp_path / "run"
    args = [
        "recipe=llamantino2_dolly",
        f"model.llm={tiny_dirs['llm']}",
        f"data.path={text_data['instructions']}",
    ]
    args += ["engine=single", "train.max_steps=2", "train.save_last=false", f"output_dir={run_dir}"]
    assert main(["train", *args]) == 0
    assert latest_checkpoint(run_dir) is None
    assert 2 in _metrics(run_dir)
