"""Our exported LlavaNext folders load in plain transformers 4.57 and compute what transformers 5 computes.

transformers 4.57.6 (with the ``tokenizers`` and ``huggingface_hub`` versions it needs) is pip-installed
once, without dependencies, into ``~/.cache/llava_ndino/transformers-4.57.6`` (override with
``LLAVA_NDINO_TF4_DIR``); a subprocess puts that folder first on ``PYTHONPATH`` and takes torch,
numpy and PIL from this venv. The test is skipped only when that install is impossible (no network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

VERSION = "4.57.6"
# transformers 4.57 needs tokenizers < 0.23.1 and huggingface_hub < 1.0, which needs requests.
PACKAGES = [
    f"transformers=={VERSION}",
    "tokenizers>=0.22,<0.23.1",
    "huggingface_hub>=0.34,<1.0",
    "requests",
    "urllib3",
    "certifi",
    "charset_normalizer",
]
QUESTION = "Cosa c'è in questa immagine?"
SIZES_WH = [(200, 100), (336, 336)]

# Runs under transformers 4.57: argv = folder, inputs.safetensors, result.json, question, image paths...
SCRIPT = """
import json, sys
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

folder, inputs_path, result_path, question, *image_paths = sys.argv[1:]
model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
model.eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
result = {
    "version": transformers.__version__,
    "loading_info": {k: [str(x) for x in v] for k, v in info.items()},
    "tokenizer_class": type(processor.tokenizer).__name__,
    "image_processor_class": type(processor.image_processor).__name__,
    "rope_theta": model.config.text_config.rope_theta,
    "eos_token_id": model.generation_config.eos_token_id,
    "prompt": prompt,
    "input_ids": [],
    "logits": [],
    "generated": [],
}
pixels = {}
for i, path in enumerate(image_paths):
    encoded = processor(images=[Image.open(path)], text=[prompt], add_special_tokens=False, return_tensors="pt")
    result["input_ids"].append(encoded["input_ids"][0].tolist())
    pixels[f"pixel_values_{i}"] = encoded["pixel_values"].contiguous()
save_file(pixels, result_path + ".pixels.safetensors")
tensors = load_file(inputs_path)
for i in range(len(image_paths)):
    with torch.no_grad():
        logits = model(
            input_ids=tensors[f"input_ids_{i}"],
            pixel_values=tensors[f"pixel_values_{i}"],
            image_sizes=tensors[f"image_sizes_{i}"],
        ).logits
        generated = model.generate(
            input_ids=tensors[f"input_ids_{i}"],
            pixel_values=tensors[f"pixel_values_{i}"],
            image_sizes=tensors[f"image_sizes_{i}"],
            max_new_tokens=6,
            do_sample=False,
        )
    result["logits"].append(logits[0].tolist())
    result["generated"].append(generated[0].tolist())
with open(result_path, "w") as handle:
    json.dump(result, handle)
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread than on several contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def transformers4_dir() -> Path:
    """Return the side folder holding transformers 4.57.6, installing it on first use (or skip)."""
    default = Path.home() / ".cache" / "llava_ndino" / f"transformers-{VERSION}"
    target = Path(os.environ.get("LLAVA_NDINO_TF4_DIR", default))
    if (target / "INSTALLED").is_file():
        return target
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    done = subprocess.run(
        [*command, "--target", str(tmp), *PACKAGES], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot install transformers {VERSION} (no network?): {done.stderr.strip()[-500:]}")
    (tmp / "INSTALLED").write_text(" ".join(PACKAGES) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def test_transformers4_loads_export_with_same_logits(tiny_llava_dir: Path, tmp_path: Path) -> None:
    side = transformers4_dir()
    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_llava_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    image_paths, tensors, input_ids, logits, generated = [], {}, [], [], []
    for i, (w, h) in enumerate(SIZES_WH):
        image_paths.append(tmp_path / f"image{i}.png")
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(image_paths[-1])
        encoded = processor(images=[image], text=[prompt], add_special_tokens=False, return_tensors="pt")
        for key in ("input_ids", "pixel_values", "image_sizes"):
            tensors[f"{key}_{i}"] = encoded[key].contiguous()
        input_ids.append(encoded["input_ids"][0].tolist())
        with torch.no_grad():
            logits.append(model(**encoded).logits[0])
            generated.append(model.generate(**encoded, max_new_tokens=6, do_sample=False)[0].tolist())
    save_file(tensors, str(tmp_path / "inputs.safetensors"))

    env = {
        **os.environ,
        "PYTHONPATH": str(side),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    (tmp_path / "run4.py").write_text(SCRIPT)
    result_path = tmp_path / "result.json"
    args = [str(tiny_llava_dir), str(tmp_path / "inputs.safetensors"), str(result_path), QUESTION]
    args += [str(path) for path in image_paths]
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run4.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(result_path.read_text())

    assert result["version"] == VERSION
    assert result["loading_info"] == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert result["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert result["image_processor_class"].startswith("LlavaNextImageProcessor")
    assert result["rope_theta"] == model.config.text_config.rope_parameters["rope_theta"]
    assert sorted(result["eos_token_id"]) == sorted(model.generation_config.eos_token_id)
    assert result["prompt"] == prompt
    assert result["input_ids"] == input_ids
    # 4.x resizes with PIL, 5.x with torch: pixels agree exactly only where no resize happens (336x336)
    pixels = load_file(str(result_path) + ".pixels.safetensors")
    for i, (w, h) in enumerate(SIZES_WH):
        theirs, ours = pixels[f"pixel_values_{i}"], tensors[f"pixel_values_{i}"]
        assert theirs.shape == ours.shape
        torch.testing.assert_close(theirs, ours, atol=1e-5 if (w, h) == (336, 336) else 0.05, rtol=0)
    assert result["generated"] == generated  # greedy, with the generation_config.json of the export
    for theirs, ours in zip(result["logits"], logits, strict=True):
        torch.testing.assert_close(torch.tensor(theirs), ours, atol=1e-4, rtol=0)
