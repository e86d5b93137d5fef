#!/bin/bash
# The plan for the next lent GPU session's Qwen easy-VQA model (see README.md here), once the weights
# have arrived. It runs ~12 min on an H100, more than one device call may take (10 min), so start it
# detached and collect in a later call, with no gap longer than the machine's 30 s idle release
# (it takes its disk with it, as it did on 2026-11-23):
#   call 1:  setsid nohup docs/experiments/gpu_2026-11-23/device_run.sh > /tmp/run.log 2>&1 < /dev/null &
#            then wait up to ~9 min for /tmp/out/result.tgz.0
#   call 2:  wait for /tmp/out/latency.tgz; cp /tmp/out/* "$OUT"/
# The checkpoint is packed as soon as the eval ends, so a lost benchmark never costs the model.
# Expects: wheels (transformers, peft, gguf, easy-vqa) under /tmp/site and the Qwen weights installed
# by `mmllm weights install qwen2.5-0.5b-instruct` with MMLLM_HOME=/tmp/mmllm.
set -euo pipefail
mkdir -p /tmp/logs /tmp/out
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MMLLM_HOME=/tmp/mmllm
python3 -m mmllm train configs/easyvqa/qwen_vision.yaml > /tmp/logs/stage0.log 2>&1
python3 -m mmllm train configs/easyvqa/qwen.yaml > /tmp/logs/stage1.log 2>&1
python3 -m mmllm eval --task easy-vqa --data easy-vqa:test --model runs/easyvqa_qwen/model \
  --out runs/easyvqa_qwen/eval --max-new-tokens 4 --batch-size 256 --dtype fp32 > /tmp/logs/eval.log 2>&1
# The checkpoint first (the files that matter), then the benchmark.
tar czf /tmp/result.tgz runs/easyvqa_qwen_vision/metrics.jsonl runs/easyvqa_qwen/model \
  runs/easyvqa_qwen/metrics.jsonl runs/easyvqa_qwen/eval /tmp/logs
split -b 15000000 -d -a 1 /tmp/result.tgz /tmp/out/result.tgz.
python3 benchmarks/latency.py --model default --reps 5 --name latency_gpu > /tmp/logs/latency.log 2>&1
python3 benchmarks/latency.py --model runs/easyvqa_qwen/model --reps 5 --name latency_gpu_easyvqa >> /tmp/logs/latency.log 2>&1
tar czf /tmp/out/latency.tgz benchmarks/results/latency_gpu* /tmp/logs/latency.log  # at most 8 files come back
