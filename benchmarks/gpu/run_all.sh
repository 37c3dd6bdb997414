#!/usr/bin/env bash
# Real-size measurements on one GPU, as run on the lent H100 (see benchmarks/RESULTS.md).
# Usage: OUT=results-folder bash benchmarks/gpu/run_all.sh
# Needs diffusers importable (on the lent machine it travels as a wheel in .whl/).
set -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  date -u
  echo "== SD v1.4, 512 px, fp16"
  python3 -m diffusers_bksdm.cli bench --teacher_config sd-v1-4 --device cuda --dtype fp16 --resolution 512 \
    --repeats 30 --warmup 5 --steps 25 --pipeline_repeats 3 --output_dir "$OUT/sd14"
  echo "== SD v1.4, 512 px, fp16, 8 images per call"
  python3 -m diffusers_bksdm.cli bench --teacher_config sd-v1-4 --device cuda --dtype fp16 --resolution 512 \
    --batch_size 8 --repeats 20 --warmup 3 --steps 25 --pipeline_repeats 5 --no_chart --output_dir "$OUT/sd14b8"
  echo "== SD v2.1 (v-prediction), 768 px, fp16"
  python3 -m diffusers_bksdm.cli bench --teacher_config sd-v2-1 --device cuda --dtype fp16 --resolution 768 \
    --repeats 30 --warmup 5 --steps 25 --pipeline_repeats 5 --no_chart --output_dir "$OUT/sd21"
  echo "== SDXL base 1.0, 1024 px, fp16"
  python3 -m diffusers_bksdm.cli bench --teacher_config sdxl-base-1.0 --device cuda --dtype fp16 --resolution 1024 \
    --repeats 20 --warmup 5 --steps 25 --pipeline_repeats 3 --no_chart --output_dir "$OUT/sdxl"
  echo "== SDXL distillation steps (KOALA sizes, bk vs self-attn pairs)"
  for spec in "koala-700m bk" "koala-700m self-attn" "koala-1b self-attn"; do
    set -- $spec
    python3 benchmarks/distill_step.py --real-size --config sdxl-base-1.0 --variant "$1" --feature_pairs "$2" \
      --device cuda --teacher-dtype fp16 --batch 2 --repeats 10 --memory-repeats 2
  done
  echo "== fp16 trainer paths"
  python3 benchmarks/gpu/fp16_paths.py --output_dir "$OUT/fp16-check" --mixed_precision fp16 --steps 30
  for v in base small tiny; do
    echo "== distill step, real-size SD v1.4, variant $v, batch 8, fp16 teacher"
    python3 benchmarks/distill_step.py --real-size --device cuda --teacher-dtype fp16 --batch 8 --variant $v --repeats 15 --memory-repeats 3
  done
  echo "== distill step, small + gradient checkpointing"
  python3 benchmarks/distill_step.py --real-size --device cuda --teacher-dtype fp16 --batch 8 --variant small --repeats 15 --memory-repeats 3 --gradient-checkpointing
  date -u
} 2>&1 | grep -v -E "requires torchvision|CLIPImageProcessorPil|SiglipImageProcessorPil" | tee "$OUT/log.txt"
