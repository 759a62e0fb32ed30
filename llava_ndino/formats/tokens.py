"""LLaMA-3's special tokens and Meta's chat template for Meta-Llama-3-8B-Instruct.

The values are those of the public ``meta-llama/Meta-Llama-3-8B-Instruct`` tokenizer files
(``tokenizer_config.json``); templates, the tiny tokenizer and exported processors all use them.
"""

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
LLAMA3_SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    START_HEADER,
    END_HEADER,
    "<|reserved_special_token_2|>",
    EOT,
]


# Meta's chat template for Meta-Llama-3-8B-Instruct: each turn is a header, the trimmed content and
# <|eot_id|>; bos only before the first turn; no default system prompt.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
