#!/usr/bin/env bash
# The device checks, as one prepared script for a CUDA machine (16 cores + one GPU), most telling first:
#   1. benchmarks/scale.py       issue 19's line: ResNet-18, N = 100k, plain inference, then the full
#                                `diffin score` (influence + self-influence + label_issue, scores published;
#                                the feature store that follows publishing is not in it); the ratio is
#                                printed (target: the score within 3x inference's time on one H100)
#   2. benchmarks/gpu_check.py   FD-HVP with TF32 on/off vs the exact HVP (issue 7)
#   3. benchmarks/scale.py       the other GPU rows (influence paths, TracIn's score) + CPU rows (small CNN
#                                10k/100k/1M, ResNet-18 N = 1,000) (issue 11)
#   4. benchmarks/precision.py   float32 vs bfloat16/float16 scoring on CUDA (issue 11, item 3)
# Results go to $OUT (or benchmarks/results when OUT is unset). Runs from the repository root
# with the machine's own python3/torch (PYTHONPATH=. instead of an install). Each step has its own
# deadline (seconds): LINE_DEADLINE, SCALE_DEADLINE; a step that fails does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 1. issue 19: ResNet-18 N = 100k, diffin score vs plain inference (same project, same checkpoints)
python3 benchmarks/scale.py --cases gpu --gpu-runs diffin:inference,diffin:score --gpu-n 100000 \
    --gpu-budget-mb 40000 --threads 4 --deadline "${LINE_DEADLINE:-360}" --work /tmp/diffin_scale \
    --out "$OUT" 2>&1 | tee "$OUT/scale_line.log"
python3 - "$OUT/scale.csv" <<'EOF' 2>&1 | tee -a "$OUT/scale_line.log"
import sys
import pandas as pd
try:
    df = pd.read_csv(sys.argv[1])
except OSError:
    sys.exit("[line] no scale.csv: neither case finished")
g = df[(df.device == "cuda") & (df.model == "resnet18") & (df.N == 100000)]
inf = g[g.path == "inference"].wall_s
sc = g[(g.path == "score") & (g.method == "diffin")].wall_s
if len(inf) and len(sc):
    r = float(sc.iloc[0]) / float(inf.iloc[0])
    print(f"[line] ResNet-18 N=100k on the GPU: diffin score {float(sc.iloc[0]):.1f} s, plain inference "
          f"{float(inf.iloc[0]):.1f} s: {r:.2f}x (target <= 3x: {'met' if r <= 3 else 'NOT met'})")
else:
    print(f"[line] incomplete: inference {'done' if len(inf) else 'missing'}, score {'done' if len(sc) else 'missing (timed out?)'}")
EOF

# 2. HVP precision checks
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
[ -f benchmarks/results/gpu_check.csv ] && [ "$OUT" != benchmarks/results ] && cp benchmarks/results/gpu_check.csv "$OUT/"

# 3. the other scale rows (the rows above are kept in scale.csv: scale.py merges by N/model/method/path/device)
python3 benchmarks/scale.py --cases "${CASES:-gpu,resnet,cnn}" \
    --gpu-runs "${GPU_RUNS:-diffin:influence,tracin:influence,tracin:score}" --sizes 10000,100000,1000000 --resnet-n 1000 \
    --gpu-n 100000 --threads 4 --jobs 3 --budget-mb 3000 --gpu-budget-mb 40000 \
    --deadline "${SCALE_DEADLINE:-330}" --work /tmp/diffin_scale --out "$OUT" 2>&1 | tee "$OUT/scale.log"

# 4. low precision on CUDA
python3 benchmarks/precision.py --device cuda --precisions float32,bfloat16,float16 --out "$OUT" 2>&1 | tee "$OUT/precision.log"
