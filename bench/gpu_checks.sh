#!/usr/bin/env bash
# The GPU checks as one run, each under its own timeout, results under $OUT:
#   carried wheels (.whl/, if present) -> bench/gpu_step.py (with the anchor, if given) ->
#   bench/demo_attention.py (eager vs sdpa) -> pytest tests/gpu -> the whole demo if time is left.
# ANCHOR (optional): path of an external plain-transformers LlavaNext step script, not part of this
# repository, passed to bench/gpu_step.py as --anchor PATH; unset, gpu_step.py runs without it.
# Figures and what they mean: docs/benchmarks.md (GPU section). Dry run on CPU, e.g.:
#   OUT=/tmp/gpu_dry PY=.venv/bin/python SKIP_WHEELS=1 SKIP_DEMO=1 DEMO_STEPS=20 \
#   GPU_STEP_ARGS="--tiny --steps 4 --log-every 2 --workers 2" bash bench/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ date; nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"

echo "== [$SECONDS s] bench/gpu_step.py (ZeRO-2, CLIP-L/336 + 1.2B LM, bf16, checkpointing; anchor if given)"
timeout ${T_STEP:-240} $PY bench/gpu_step.py ${ANCHOR:+--anchor "$ANCHOR"} --out "$OUT/gpu_step.json" ${GPU_STEP_ARGS:-} 2>&1 | grep -v "it/s\]" | tail -25 | tee "$OUT/gpu_step.txt"

echo "== [$SECONDS s] bench/demo_attention.py (demo recipe on CUDA bf16, eager vs sdpa)"
timeout ${T_ATTN:-150} $PY bench/demo_attention.py --steps ${DEMO_STEPS:-300} --out "$OUT/demo_attention.json" 2>&1 | tail -8 | tee "$OUT/demo_attention.txt"

echo "== [$SECONDS s] pytest tests/gpu"
timeout ${T_TEST:-180} $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"

LEFT=$(( ${BUDGET:-530} - SECONDS ))
if [ "${SKIP_DEMO:-0}" != 1 ] && [ $LEFT -gt 100 ]; then
  echo "== [$SECONDS s] full demo on CUDA (train, eval, export, ask), $LEFT s left"
  timeout $LEFT $PY -m llava_ndino.cli demo output_dir=/tmp/demo_gpu 2>&1 | grep -v "it/s\]\|step/s" | tail -30 | tee "$OUT/demo_full.txt"
  cp /tmp/demo_gpu/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
else
  echo "== [$SECONDS s] full demo skipped ($LEFT s left)"
fi
echo "== done at $SECONDS s"
