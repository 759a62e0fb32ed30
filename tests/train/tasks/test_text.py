"""Text tasks: DPO against TRL's own loss code, LoRA under gradient checkpointing, QLoRA on CPU, and
adapter-only checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llava_ndino.config import load_config
from llava_ndino.data.encode import IGNORE_INDEX
from llava_ndino.synthetic.text_samples import write_text_samples
from llava_ndino.train.optim import make_optimizer
from llava_ndino.train.tasks.registry import make_task
from llava_ndino.train.tasks.text import TextTask


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic Italian text sets, small."""
    return write_text_samples(tmp_path_factory.mktemp("text"), count=40)


def build(tiny_dirs, data: Path, *overrides: str) -> TextTask:
    """A built text task on the tiny LLaMA (float32, LoRA r 4 on all linear layers by default)."""
    adapters = [] if "lora.enabled=false" in overrides else ["lora.r=4", "lora.dropout=0"]
    cfg = load_config(
        [
            "recipe=legal_cpt",
            f"model.llm={tiny_dirs['llm']}",
            f"data.path={data}",
            "output_dir=unused",
            "model.dtype=float32",
            "data.max_length=64",
            *adapters,
            *overrides,
        ]
    )
    torch.set_num_threads(1)
    task = make_task(cfg)
    task.build()
    return task


def first_batch(task: TextTask, size: int = 2) -> dict[str, torch.Tensor]:
    """The first ``size`` items of the task's data set, collated."""
    dataset = task.dataset("train")
    return task.collator()([dataset[i] for i in range(size)]).tensors


def lora_b(task: TextTask) -> dict[str, torch.Tensor]:
    """A copy of every LoRA B matrix."""
    return {n: p.detach().clone() for n, p in task.model.named_parameters() if "lora_B" in n}


def train_step(task: TextTask, batch: dict[str, torch.Tensor], optimizer: str = "adamw") -> float:
    """One optimiser step on ``batch``, as the loop takes it; returns the loss per target."""
    opt = make_optimizer(optimizer, task.param_groups())
    loss_sum, _ = task.loss_sum(task.model, batch)
    loss = loss_sum / task.targets(batch)
    loss.backward()
    opt.step()
    return float(loss)


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_with_gradient_checkpointing_moves_the_b_matrices(tiny_dirs, text_data, reentrant: bool) -> None:
    task = build(tiny_dirs, text_data["text"], "train.gradient_checkpointing=true")
    task.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert task.model.is_gradient_checkpointing
    before = lora_b(task)
    assert before and all(not b.any() for b in before.values()), "LoRA B starts at zero"
    train_step(task, first_batch(task))
    after = lora_b(task)
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert moved == list(before), f"B matrices that did not move: {set(before) - set(moved)}"


def test_qlora_runs_on_cpu_with_nf4_double_quant_and_paged_adamw(tiny_dirs, text_data) -> None:
    import bitsandbytes as bnb

    task = build(
        tiny_dirs,
        text_data["text"],
        "lora.quantize=4bit",
        "train.gradient_checkpointing=true",
        "train.optimizer=paged_adamw_8bit",
    )
    quantised = [m for m in task.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised, "no layer was quantised"
    state = quantised[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "NF4 with double quantisation"
    assert quantised[0].compute_dtype == torch.bfloat16
    before = lora_b(task)
    loss = train_step(task, first_batch(task), optimizer="paged_adamw_8bit")
    assert torch.isfinite(torch.tensor(loss))
    after = lora_b(task)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_adapter_checkpoints_hold_only_adapters_and_refuse_mismatches(tiny_dirs, text_data) -> None:
    task = build(tiny_dirs, text_data["text"])
    state = task.checkpoint_state(task.model.state_dict())
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all("lora_" in k for k in state)
    task.load_state(state)
    with pytest.raises(ValueError, match="missing"):
        task.load_state(dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="unexpected"):
        task.load_state({**state, "base_model.model.lm_head.weight": torch.zeros(1)})
    full = build(tiny_dirs, text_data["text"], "lora.enabled=false")
    assert full.checkpoint_state(full.model.state_dict()).keys() == full.model.state_dict().keys()


def _trl_inputs(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The same pairs in TRL's own preference collator (prompt ids + completion ids per row)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pairs = batch["input_ids"].shape[0] // 2
    examples = []
    for row in range(pairs):
        sides = []
        for index in (row, row + pairs):
            ids, labels = batch["input_ids"][index], batch["labels"][index]
            real = ids[batch["attention_mask"][index].bool()]
            first = int((labels != IGNORE_INDEX).nonzero()[0])
            sides.append((real[:first].tolist(), real[first:].tolist()))
        assert sides[0][0] == sides[1][0], "chosen and rejected share the prompt"
        examples.append({"prompt_ids": sides[0][0], "chosen_ids": sides[0][1], "rejected_ids": sides[1][1]})
    return DataCollatorForPreference(pad_token_id=pad_token_id)(examples)


@pytest.mark.parametrize("lora", [False, True], ids=["full-frozen-reference", "lora-adapters-disabled"])
def test_dpo_loss_and_gradients_equal_trl(tiny_dirs, text_data, tmp_path: Path, lora: bool) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    task = build(
        tiny_dirs,
        text_data["preferences"],
        "objective=dpo",
        "data.template=llama3",
        "data.max_length=128",
        f"lora.enabled={str(lora).lower()}",
    )
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference
        for name, param in task.model.named_parameters():
            if param.requires_grad and (not lora or "lora_B" in name):
                param.add_(0.05 * torch.randn_like(param))
    batch = first_batch(task, size=3)
    inputs = _trl_inputs(batch, task.tokenizer.pad_token_id)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])

    loss_sum, stats = task.loss_sum(task.model, batch)
    pairs = task.targets(batch)
    (loss_sum / pairs).backward()
    # TRL's own set-up of each case: a fresh adapter on the base (reference: adapters disabled), or a
    # fully trained policy with a frozen reference model
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path), beta=task.cfg.dpo.beta, report_to="none", use_cpu=True, bf16=False
    )
    trainer = DPOTrainer(
        model=base if lora else copy.deepcopy(task.model),
        ref_model=None if lora else base,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=task.tokenizer,
        peft_config=copy.deepcopy(task.model.peft_config["default"]) if lora else None,
    )
    if lora:
        adapters = task.checkpoint_state(task.model.state_dict())
        assert not trainer.model.load_state_dict(adapters, strict=False).unexpected_keys
    trainer.model.zero_grad()
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    torch.testing.assert_close(loss_sum / pairs, trl_loss, rtol=1e-5, atol=1e-6)
    ours = {n: p.grad for n, p in task.model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert stats["reward_margin"] / pairs == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert stats["reward_chosen"] / pairs == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert stats["reward_accuracy"] / pairs == pytest.approx(metrics["rewards/accuracies"])


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_sft_task_trains_on_what_data_train_on_says(tiny_dirs, text_data, train_on: str) -> None:
    """data.train_on reaches the SFT encoder: answers only, or every token as ANITA's SFT script."""
    cfg = load_config(
        [
            "recipe=anita_sft",
            f"model.llm={tiny_dirs['llm']}",
            f"data.path={text_data['chat']}",
            "output_dir=unused",
            "model.dtype=float32",
            "lora.quantize=none",
            f"data.train_on={train_on}",
        ]
    )
    task = make_task(cfg)
    task.build()
    sample = task.dataset("train")[0]
    labelled = (sample.labels != IGNORE_INDEX).sum().item()
    if train_on == "all":
        assert labelled == sample.input_ids.numel()
    else:
        assert 0 < labelled < sample.input_ids.numel()
