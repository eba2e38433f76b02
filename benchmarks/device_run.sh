#!/usr/bin/env bash
# The device checks, as one prepared script for a CUDA machine (16 cores + one GPU):
#   1. benchmarks/gpu_check.py   FD-HVP with TF32 on/off vs the exact HVP (issue 7)
#   2. benchmarks/scale.py       GPU row (ResNet-18, N = 100k) + CPU rows (small CNN 10k/100k/1M,
#                                ResNet-18 N = 1,000) (issue 11)
#   3. benchmarks/precision.py   float32 vs bfloat16/float16 scoring on CUDA (issue 11, item 3)
# Results go to $OUT (or benchmarks/results when OUT is unset). Runs from the repository root
# with the machine's own python3/torch (PYTHONPATH=. instead of an install).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
[ -f benchmarks/results/gpu_check.csv ] && [ "$OUT" != benchmarks/results ] && cp benchmarks/results/gpu_check.csv "$OUT/"
python3 benchmarks/scale.py --cases "${CASES:-gpu,resnet,cnn}" \
    --gpu-runs "${GPU_RUNS:-diffin:influence,tracin:influence,diffin:inference,diffin:score,tracin:score}" --sizes 10000,100000,1000000 --resnet-n 1000 \
    --gpu-n 100000 --threads 4 --jobs 3 --budget-mb 3000 --gpu-budget-mb 40000 \
    --deadline "${SCALE_DEADLINE:-330}" --work /tmp/diffin_scale --out "$OUT" 2>&1 | tee "$OUT/scale.log"
python3 benchmarks/precision.py --device cuda --precisions float32,bfloat16,float16 --out "$OUT" 2>&1 | tee "$OUT/precision.log"
