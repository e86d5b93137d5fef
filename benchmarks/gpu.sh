#!/usr/bin/env bash
# The speed benchmarks in one short run on a GPU machine (about 5 minutes on an H100/H200), results
# as JSON and markdown in OUT:
#   latency_<device>          eager vs compiled decoding (static KV cache, CUDA graphs): TTFT,
#                             tokens/s at batch 1, a 32-token answer with an image, MFU
#   train_throughput_<device> stage 1 and stage 2 (LoRA), padded vs packed, bf16, batch 16 and 64
#   train_packing_<device>    the pad tokens' share, padded vs packed
#   train_compiled_<device>   stage 2 at the largest batch, eager vs `compile: true` (last: the
#                             compiles take the longest)
# Qwen2.5-0.5B's architecture with random weights under a CLIP ViT-B/32 tower and easy-VQA-like
# synthetic data: speed does not depend on weight values, and nothing has to be downloaded. Needs
# torch, transformers, peft and accelerate; what mmllm needs beyond them (Pillow, transformers >= 5.24
# and the huggingface_hub it takes) is installed, for this run only, from the wheels in
# $MMLLM_WHEELS (default .gpu-wheels/, which `make gpu-wheels` fills). `--device cpu` runs the same
# steps small (SmolLM2-135M's layers, 2 of them, fewer steps), to test the script without a GPU.
#
#     benchmarks/gpu.sh OUT [--device cuda|cpu]
set -euo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu.sh OUT [--device cuda|cpu]}")
device=cuda
if [ "${2:-}" = "--device" ]; then device=${3:?--device needs cuda or cpu}; fi
cd "$(dirname "$0")/.."
wheels=$(realpath -m "${MMLLM_WHEELS:-.gpu-wheels}")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
missing=$(python - <<'PY'
import importlib.metadata as metadata
from importlib.util import find_spec

from packaging.version import Version


def older(name: str, version: str) -> bool:
    try:
        return Version(metadata.version(name)) < Version(version)
    except metadata.PackageNotFoundError:
        return True


needs = {"pillow": find_spec("PIL") is None, "transformers==5.24.0": older("transformers", "5.24")}
needs["huggingface_hub==1.33.0"] = older("huggingface_hub", "1.31")
print(" ".join(name for name, needed in needs.items() if needed))
PY
)
if [ -n "$missing" ]; then
  deps=$(mktemp -d)
  echo "installing for this run, from $wheels: $missing"
  python -m pip install --quiet --no-deps --no-index --find-links "$wheels" --target "$deps" $missing
  export PYTHONPATH="$deps:$PYTHONPATH"
fi
if [ "$device" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  lm=smollm2-2-layers reps=1 tokens=8 batches=2 steps=3
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
python benchmarks/train_throughput.py --random "$lm" --data synthetic --steps "$steps" --stages 2 \
  --batch-sizes "${batches##*,}" --compile --out "$out" --name "train_compiled_$device"
echo "benchmarks/gpu.sh: $((SECONDS - start)) s; results in $out"
