# CPU image for `mmllm serve` (API + chat page). Build: docker build -t mmllm .
# Run: docker run -p 8000:8000 mmllm   ->  http://localhost:8000/docs and http://localhost:8000/ui
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MMLLM_HOME=/opt/mmllm MMLLM_MODELS=/app/models
WORKDIR /app

# torch and torchvision first, from the CPU index, so no other dependency can pull a CUDA build.
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[samples,serve,ui,audio,export,data]"

COPY configs ./configs
COPY models ./models
# The shipped models reference their base LM by name: install its weights (and Whisper for voice).
RUN mmllm weights install smollm2-135m-instruct whisper-base

ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["mmllm", "serve", "--host", "0.0.0.0", "--port", "8000", "--ui"]
