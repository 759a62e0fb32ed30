"""Asking a LlavaNext model about images: one question, a batch, streaming, or a JSONL file.

The prompt is the processor's own chat template (LLaMA-3 for LLaVA-NDiNO, no system prompt) with
the generation prompt appended; decoding is greedy at temperature 0 and sampled otherwise, and it
stops on every end token the checkpoint knows (``<|eot_id|>`` as well as ``<|end_of_text|>``).
Batches are left-padded so that every row continues right after its own prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import LlavaNextForConditionalGeneration, TextStreamer

from llava_ndino.data.conversation import SampleError, control_token_pattern, escape_control_tokens
from llava_ndino.data.images import image_path, load_image
from llava_ndino.model.build import LoadOptions, stop_token_ids

log = logging.getLogger(__name__)


DEFAULT_MAX_PROMPT_TOKENS = 4096
"""Longest question prompt ``ndino ask`` accepts, in tokens (image tokens aside)."""


class _CallbackStreamer(TextStreamer):
    """A ``TextStreamer`` that hands each finished piece of answer text to a callback."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


class Answerer:
    """Answer questions about images with a LlavaNext model and its processor."""

    def __init__(self, model: LlavaNextForConditionalGeneration, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if processor.chat_template is None:
            if self.tokenizer.chat_template is None:
                raise ValueError(
                    "the processor has no chat template; re-export the model with `ndino export`"
                )
            processor.chat_template = self.tokenizer.chat_template
        # released checkpoints may stop only on <|end_of_text|>; a chat turn ends with <|eot_id|>
        self.control_pattern = control_token_pattern(
            self.tokenizer
        )  # <image> included: one image per question
        self.stop_ids = sorted(stop_token_ids(self.tokenizer, model.generation_config.eos_token_id))
        if not self.stop_ids:
            raise ValueError(
                "the model has no end-of-sequence token: set eos_token_id in generation_config.json"
            )

    @classmethod
    def from_path(cls, path: Path, dtype: str = "auto", attn_implementation: str = "sdpa") -> Answerer:
        """Same as :func:`load_answerer`."""
        return load_answerer(path, dtype, attn_implementation)

    def prompt(self, question: str) -> str:
        """Return the chat-template prompt for one image and ``question``, ending with the assistant header."""
        text = escape_control_tokens(
            question, self.control_pattern
        )  # a question is text, never control tokens
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @contextmanager
    def _left_padding(self) -> Iterator[None]:
        """Pad on the left while generating (prompts must end where generation starts)."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            yield
        finally:
            self.tokenizer.padding_side = side

    @torch.inference_mode()
    def _generate(
        self,
        items: list[tuple[Image.Image, str]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        streamer: TextStreamer | None = None,
    ) -> list[str]:
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        with self._left_padding():
            inputs = self.processor(
                images=[image for image, _ in items],
                text=[self.prompt(question) for _, question in items],
                padding=True,
                add_special_tokens=False,  # the chat template already starts with <|begin_of_text|>
                return_tensors="pt",
            )
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def ask(
        self,
        image: Image.Image,
        question: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Answer ``question`` about ``image``; ``stream`` receives the answer text piece by piece as it is generated."""
        streamer = _CallbackStreamer(self.tokenizer, stream) if stream is not None else None
        return self._generate([(image, question)], max_new_tokens, temperature, top_p, streamer)[0]

    def ask_batch(
        self,
        items: list[tuple[Image.Image, str]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answer several (image, question) pairs in one left-padded ``generate`` call, in order."""
        if not items:
            return []
        return self._generate(list(items), max_new_tokens, temperature, top_p)

    def answer_jsonl(
        self,
        in_path: Path,
        out_path: Path,
        batch_size: int = 8,
        image_root: Path | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        **generation: float,
    ) -> dict[str, int]:
        """Answer every ``{"id", "image", "question"}`` line of ``in_path`` into ``out_path``.

        Each output line is ``{"id", "question", "answer"}``, or ``{"id", "error"}`` for a line that is
        not such an object, a missing or unreadable image, or a question above ``max_prompt_tokens``;
        the other lines still get answers. Lines are written to ``OUT.partial`` as they are answered and
        the file replaces ``out_path`` at the end, so an interrupted batch never truncates an earlier
        ``out_path``, and running it again answers only the ids not answered yet. Image paths are
        relative to ``image_root`` (default: the current directory). Returns the counts.
        """
        requests = _read_requests(Path(in_path))
        root = Path(image_root) if image_root else Path(".")
        out_path = Path(out_path)
        partial = _resume_partial(out_path)
        done = _answered_ids(partial)
        todo = [r for r in requests if "error" in r or str(r["id"]) not in done]
        counts = {"answered": 0, "errors": 0, "already_done": len(requests) - len(todo)}
        with (
            open(partial, "a", encoding="utf-8") as out,
            tqdm(total=len(todo), desc="answering", unit="q") as bar,
        ):
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                results = self._answer_chunk(chunk, root, max_prompt_tokens, generation)
                for result in results:
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                out.flush()
                counts["answered"] += sum("answer" in r for r in results)
                counts["errors"] += sum("error" in r for r in results)
                bar.update(len(chunk))
        os.replace(partial, out_path)
        return counts

    def _answer_chunk(
        self, chunk: list[dict], root: Path, max_prompt_tokens: int, generation: dict
    ) -> list[dict]:
        """Results for one chunk of requests, in order: answers, or an error per unusable request."""
        results: list[dict] = []
        ready: list[tuple[int, Image.Image, str]] = []
        for request in chunk:
            if "error" in request:
                results.append(request)
                continue
            try:
                self.check_prompt_length(request["question"], max_prompt_tokens, str(request["id"]))
                image = read_image(image_path(root, request["image"], str(request["id"])), str(request["id"]))
                ready.append((len(results), image, request["question"]))
                results.append({"id": request["id"], "question": request["question"]})
            except SampleError as err:
                log.warning("%s", err)
                results.append({"id": request["id"], "error": str(err)})
        answers = self.ask_batch([(image, question) for _, image, question in ready], **generation)
        for (index, _, _), answer in zip(ready, answers, strict=True):
            results[index]["answer"] = answer
        return results

    def check_prompt_length(self, question: str, max_prompt_tokens: int, sample_id: str = "question") -> None:
        """Raise :class:`SampleError` when ``question``'s prompt is above ``max_prompt_tokens`` tokens
        (image tokens aside): a 20,000-word question must not exhaust the host's memory."""
        length = len(self.tokenizer(self.prompt(question), add_special_tokens=False)["input_ids"])
        if length > max_prompt_tokens:
            raise SampleError(
                sample_id,
                "prompt_too_long",
                f"the question's prompt is {length} tokens, above --max-prompt-tokens {max_prompt_tokens}",
            )


def read_image(path: Path, sample_id: str) -> Image.Image:
    """Open ``path`` as RGB, or raise :class:`SampleError` naming the sample and the file."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(
            sample_id, "missing_image", f"image {path} does not exist (check the path or --image-root)"
        )
    return load_image(path, sample_id)


def load_answerer(path: Path, dtype: str = "auto", attn_implementation: str = "sdpa") -> Answerer:
    """Load an :class:`Answerer` from a run directory, a checkpoint or any HF LlavaNext folder (on CUDA if available)."""
    from llava_ndino.model.loading import load_trained

    model, processor = load_trained(
        Path(path), LoadOptions(dtype=dtype, attn_implementation=attn_implementation)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Answerer(model.to(device), processor)


def _resume_partial(out_path: Path) -> Path:
    """``OUT.partial`` to append to: an interrupted run's, or a fresh one seeded with ``out_path``'s lines."""
    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists():
        partial.write_text(
            out_path.read_text(encoding="utf-8") if out_path.is_file() else "", encoding="utf-8"
        )
    return partial


def _answered_ids(path: Path) -> set[str]:
    """Ids of the lines of ``path`` that hold an answer (a torn last line is ignored)."""
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "answer" in row:
            done.add(str(row.get("id")))
    return done


def _read_requests(in_path: Path) -> list[dict]:
    """Every line of ``in_path`` as a request, or as ``{"id", "error"}`` when it is not a usable one."""
    requests = []
    with open(in_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                requests.append(_parse_request(line, f"{in_path}:{number}"))
    return requests


def _parse_request(line: str, where: str) -> dict:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as err:
        return {"id": where, "error": f"{where}: not valid JSON ({err})"}
    if not isinstance(request, dict):
        return {"id": where, "error": f"{where}: expected an object with id, image, question"}
    ident = request.get("id", where)
    problems = [f"missing {key}" for key in ("id", "image", "question") if key not in request]
    problems += [
        f"{key} must be text"
        for key in ("image", "question")
        if key in request and not isinstance(request[key], str)
    ]
    if "id" in request and not isinstance(ident, str | int):
        problems.append("id must be text or a number")
    if isinstance(request.get("question"), str) and not request["question"].strip():
        problems.append("question is empty")
    if problems:
        ident = ident if isinstance(ident, str | int) else where
        return {"id": ident, "error": f"{where}: {'; '.join(problems)} (each line needs id, image, question)"}
    return request
