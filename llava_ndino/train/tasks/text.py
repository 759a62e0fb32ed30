"""Text-only tasks for the LLaMAntino recipes, trained by the same loop as the VLM stages.

- ``clm``: continued pre-training on raw text packed into blocks of ``data.max_length`` tokens;
- ``sft``: instruction/chat tuning with loss on the answers, as the template marks them;
- ``dpo``: the sigmoid DPO loss with ``dpo.beta``. The reference is the base model with the
  adapters disabled for LoRA/QLoRA runs, and a frozen copy of the base for full fine-tuning.

Each can train every weight or, with ``lora.enabled``, LoRA adapters on a frozen (optionally NF4)
base; adapter runs checkpoint only the adapter weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from llava_ndino.data.dataset import Batch, Collator, EncodedDataset, JsonRecords, read_records
from llava_ndino.data.packing import model_inputs
from llava_ndino.data.text import (
    PackedCollator,
    PackedText,
    PreferenceCollator,
    PreferenceEncoder,
    SftEncoder,
)
from llava_ndino.formats.prompts import get_template
from llava_ndino.formats.run_dir import SKELETON_DIR
from llava_ndino.model.hf_files import mark_tokenizer_portable
from llava_ndino.model.peft_setup import adapter_names, add_lora, load_causal_lm, load_text_state
from llava_ndino.train.losses import dpo_loss_sum, label_positions, sequence_logps
from llava_ndino.train.metrics import lm_flops
from llava_ndino.train.tasks.base import Task

log = logging.getLogger(__name__)


class TextTask(Task):
    """Shared set-up of the text tasks: the causal LM (full, LoRA or QLoRA), its tokenizer and data path."""

    name = "text"

    def build(self) -> None:
        lora = self.cfg.lora
        if self.cfg.model.source != "causal_lm":
            raise ValueError(
                f"objective {self.cfg.objective} trains a text model: set model.source=causal_lm"
            )
        if lora.quantize == "4bit" and not lora.enabled:
            raise ValueError(
                "lora.quantize=4bit trains adapters on the quantised base: set lora.enabled=true"
            )
        torch.manual_seed(self.cfg.seed)
        model, self.tokenizer, self.base_vocab = load_causal_lm(self.cfg, quantize=lora.quantize == "4bit")
        self.template = get_template(self.cfg.data.template)
        self.lm_config = model.config
        self.lm_params = model.num_parameters(exclude_embeddings=True)
        self.model = add_lora(model, self.cfg) if lora.enabled else model
        if not lora.enabled:
            log.info("full fine-tuning of %d parameters", sum(p.numel() for p in model.parameters()))

    def save_skeleton(self, run_dir: Path) -> None:
        out = Path(run_dir) / SKELETON_DIR
        out.mkdir(parents=True, exist_ok=True)
        self.lm_config.save_pretrained(str(out))
        self.model.generation_config.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        mark_tokenizer_portable(out)
        if self.cfg.lora.enabled:
            self.model.peft_config["default"].save_pretrained(str(out))

    def param_groups(self) -> list[dict]:
        live = [p for p in self.model.parameters() if p.requires_grad]
        train = self.cfg.train
        groups = [
            {"params": [p for p in live if p.ndim >= 2], "lr": train.lr, "weight_decay": train.weight_decay},
            {"params": [p for p in live if p.ndim < 2], "lr": train.lr, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def checkpoint_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cfg.lora.enabled:
            return model_state
        names = adapter_names(self.model)
        return {k: v for k, v in model_state.items() if k in names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_text_state(self.model, state, self.cfg.lora.enabled)

    def data_path(self, split: str) -> Path:
        """``data.path`` (text objectives have one split, train)."""
        if split != "train":
            raise ValueError(f"text objectives read only data.path (split train), not split {split!r}")
        if not self.cfg.data.path:
            raise ValueError(f"objective {self.cfg.objective} needs data.path=FILE (JSONL rows)")
        return Path(self.cfg.data.path)

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        return lm_flops(self.lm_params, self.lm_config, batch["attention_mask"])


class ClmTask(TextTask):
    """Continued pre-training: documents joined with eos and cut into fixed-length blocks.

    Attention crosses document boundaries unless ``data.isolate_documents`` is set.
    """

    name = "clm"

    def dataset(self, split: str = "train") -> Dataset:
        return PackedText(read_records(self.data_path(split)), self.tokenizer, self.cfg.data.max_length)

    def collator(self) -> Callable[[list], Batch]:
        return PackedCollator(self.cfg.data.isolate_documents)


class SftTask(TextTask):
    """Instruction/chat tuning with loss on the answers (``data.packing`` packs samples without padding)."""

    name = "sft"

    def dataset(self, split: str = "train") -> Dataset:
        data = self.cfg.data
        encoder = SftEncoder(
            self.tokenizer, self.template, data.max_length, data.control_tokens, data.train_on
        )
        return EncodedDataset(JsonRecords(self.data_path(split)), encoder)

    def collator(self) -> Callable[[list], Batch]:
        data = self.cfg.data
        return Collator(self.tokenizer.pad_token_id, data.packing, data.pack_length)


class DpoTask(TextTask):
    """Direct preference optimisation on ``{"prompt", "chosen", "rejected"}`` rows; targets are pairs."""

    name = "dpo"

    def build(self) -> None:
        super().build()
        self.reference: nn.Module | None = None

    def dataset(self, split: str = "train") -> Dataset:
        data = self.cfg.data
        encoder = PreferenceEncoder(
            self.tokenizer,
            self.template,
            data.max_length,
            self.cfg.dpo.max_prompt_length,
            data.control_tokens,
        )
        return EncodedDataset(JsonRecords(self.data_path(split)), encoder)

    def collator(self) -> Callable[[list], Batch]:
        return PreferenceCollator(self.tokenizer.pad_token_id)

    def reference_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the reference model: the base with adapters disabled, or a frozen copy of the base."""
        with torch.no_grad():
            if self.cfg.lora.enabled:
                with self.model.disable_adapter():
                    return self.model(**inputs, use_cache=False).logits
            if self.reference is None:
                device = inputs["input_ids"].device
                # loading must not advance the training RNG, or resumed runs would diverge
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    reference, _, _ = load_causal_lm(self.cfg, quantize=False)
                self.reference = reference.to(device).eval().requires_grad_(False)
            return self.reference(**inputs, use_cache=False).logits

    def loss_sum(
        self, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = model_inputs(batch), batch["labels"]
        inputs["logits_to_keep"] = positions = label_positions(labels)  # the answers' positions only
        policy = sequence_logps(module(**inputs, use_cache=False).logits, labels, positions)
        reference = sequence_logps(self.reference_logits(inputs), labels, positions)
        return dpo_loss_sum(policy, reference, self.cfg.dpo.beta)

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        return super().flops(batch) * 4 / 3  # plus the reference forward: 2N of the 6N per token
