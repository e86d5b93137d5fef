#!/usr/bin/env bash
# The speed benchmarks in one short run on a GPU machine (about 5 minutes on an H100/H200), results
# as JSON and markdown in OUT:
#   latency_<device>          eager vs compiled decoding (static KV cache, CUDA graphs): TTFT,
#                             tokens/s at batch 1, a 32-token answer with an image, MFU
#   train_throughput_<device> stage 1 and stage 2 (LoRA), padded vs packed, bf16, batch 16 and 64
#   train_packing_<device>    the pad tokens' share, padded vs packed
# Qwen2.5-0.5B's architecture with random weights under a CLIP ViT-B/32 tower and easy-VQA-like
# synthetic data: speed does not depend on weight values, and nothing has to be downloaded. Needs
# torch, transformers, peft and accelerate; Pillow is installed from $MMLLM_WHEELS (`make gpu-wheels`
# fills .gpu-wheels/) where it is missing. `--device cpu` runs the same steps small (SmolLM2-135M's
# architecture, fewer steps) to test the script on a machine without a GPU.
#
#     benchmarks/gpu.sh OUT [--device cuda|cpu]
set -euo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu.sh OUT [--device cuda|cpu]}")
device=cuda
if [ "${2:-}" = "--device" ]; then device=${3:?--device needs cuda or cpu}; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import PIL" 2>/dev/null ||
  python -m pip install --quiet --no-index --find-links "${MMLLM_WHEELS:-.gpu-wheels}" pillow
if [ "$device" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  lm=smollm2-135m reps=1 tokens=8 batches=2 steps=3
else
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  lm=qwen2.5-0.5b reps=5 tokens=32 batches=16,64 steps=12
fi
mkdir -p "$out"
python -c "import json, platform, torch, transformers; print(json.dumps({'python': platform.python_version(),
  'torch': torch.__version__, 'transformers': transformers.__version__,
  'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))" | tee "$out/versions.json"
start=$SECONDS
python benchmarks/latency.py --random "$lm" --device "$device" --compile both --reps "$reps" \
  --tokens "$tokens" --out "$out" --name "latency_$device"
python benchmarks/train_throughput.py --random "$lm" --data synthetic --steps "$steps" \
  --batch-sizes "$batches" --out "$out" --name "train_throughput_$device"
echo "benchmarks/gpu.sh: $((SECONDS - start)) s; results in $out"
