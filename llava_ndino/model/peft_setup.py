"""Text causal LMs for the LLaMAntino recipes: tokenizer set-up, full fine-tuning, LoRA and QLoRA.

QLoRA loads the frozen base with bitsandbytes NF4 weights, double quantisation and bf16 compute,
then prepares it for k-bit training (norms and embeddings in fp32, inputs that require grad).
Gradient checkpointing with adapters only trains when the checkpointed blocks see an input that
requires grad; the loop uses non-reentrant checkpointing and, for LoRA, the embedding output is
made to require grad as well, so the adapters always receive gradients.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llava_ndino.config import RunConfig
from llava_ndino.formats.prompts import Template, get_template
from llava_ndino.model.build import LoadOptions, ensure_pad_token, resize_embeddings_to_mean

log = logging.getLogger(__name__)

# Existing special tokens that can serve as pad without a new embedding row: LLaMA-3.1's own pad,
# then LLaMA-3's first reserved token.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


def prepare_tokenizer(llm: Path, template: Template) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``llm``; add the template's missing special tokens, a pad token that is
    never eos, and the template's chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    missing = [t for t in template.added_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        log.info("added the %s template's tokens %s to the tokenizer", template.name, missing)
    ensure_pad_token(tokenizer, PAD_CANDIDATES)
    tokenizer.chat_template = template.chat_template
    return tokenizer


def stop_ids(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """Token ids generation stops on: the template's end-of-turn token and the tokenizer's eos."""
    ids = [tokenizer.convert_tokens_to_ids(template.stop_token), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _device() -> torch.device:
    """The device this process trains on (what the loop's engine will use)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def load_causal_lm(cfg: RunConfig, quantize: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, int]:
    """Load ``cfg.model.llm`` and its prepared tokenizer; return (model, tokenizer, base vocabulary size).

    With ``quantize`` the base is NF4-quantised on this process's device. New tokens get embedding
    rows equal to the mean of the old ones.
    """
    if not cfg.model.llm:
        raise ValueError("text objectives need model.llm=DIR (an HF causal-LM folder)")
    llm = Path(cfg.model.llm)
    template = get_template(cfg.data.template)
    tokenizer = prepare_tokenizer(llm, template)
    options = LoadOptions(dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    kwargs: dict = {"dtype": options.torch_dtype(), "attn_implementation": options.attn_implementation}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": _device()}
    model = AutoModelForCausalLM.from_pretrained(str(llm), **kwargs)
    base_vocab = model.get_input_embeddings().weight.shape[0]
    resize_embeddings_to_mean(model, len(tokenizer))
    model.generation_config.eos_token_id = stop_ids(tokenizer, template)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, base_vocab


def add_lora(model: PreTrainedModel, cfg: RunConfig) -> torch.nn.Module:
    """Freeze ``model`` and wrap it with LoRA adapters as ``cfg.lora`` describes (QLoRA when quantised)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = cfg.lora
    checkpointing = cfg.train.gradient_checkpointing
    if lora.quantize == "4bit":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.enable_input_require_grads()
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters",
        lora.r,
        lora.alpha,
        config.target_modules,
        " (QLoRA, NF4 base)" if lora.quantize == "4bit" else "",
        trainable,
        total,
    )
    return peft_model


def adapter_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters of an adapter model: what an adapter checkpoint stores."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def load_text_state(model: torch.nn.Module, state: dict[str, torch.Tensor], adapters: bool) -> None:
    """Load a text run's checkpoint ``state`` into ``model``: every weight, or with ``adapters`` only
    the adapter weights, which must match the model's adapters exactly."""
    if not adapters:
        model.load_state_dict(state)
        return
    names = adapter_names(model)
    missing, unexpected = sorted(names - state.keys()), sorted(state.keys() - names)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's adapters do not match this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): resume with the lora.* settings the run was started with"
        )
    model.load_state_dict(state, strict=False)


def load_text_model(
    cfg: RunConfig, state: dict[str, torch.Tensor]
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, int]:
    """The causal LM of text run ``cfg`` (full precision, adapters attached when it trained them) with
    the checkpoint ``state`` loaded, its tokenizer and the base vocabulary size."""
    model, tokenizer, base_vocab = load_causal_lm(cfg, quantize=False)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    load_text_state(model, state, cfg.lora.enabled)
    return model, tokenizer, base_vocab
