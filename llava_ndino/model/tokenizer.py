"""A tiny LLaMA-3-style byte-level BPE tokenizer, trained on Italian text shipped with the package.

It has LLaMA-3's pre-tokenizer pattern, special tokens and chat template, so every code path that
handles a real LLaMA-3 tokenizer (templates, masking, stop tokens) is exercised by tests and the
CPU demo without downloading anything.
"""

from __future__ import annotations

from importlib import resources

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_ndino.formats.tokens import BEGIN_OF_TEXT, EOT, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS

# LLaMA-3's pre-tokenization pattern (tiktoken cl100k style): splits letters, up to 3 digits,
# punctuation and whitespace runs so that "\n\n" after a header never merges with the content.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Role names appear in every chat header; training on them keeps headers a few tokens long.
ROLE_LINES = ["system user assistant"] * 20


def italian_corpus() -> list[str]:
    """Return the Italian training lines shipped in ``llava_ndino/assets/corpus_it.txt``."""
    text = resources.files("llava_ndino").joinpath("assets/corpus_it.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tiny_tokenizer(
    vocab_size: int = 1024, extra_lines: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE with LLaMA-3's pattern, special tokens and chat template.

    The BPE ids come first; the special tokens follow them, as in LLaMA-3 (where they start at 128000).
    """
    lines = italian_corpus() + ROLE_LINES + list(extra_lines or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BEGIN_OF_TEXT)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT} $A",
                pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast
