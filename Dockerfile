# accelengine for cloud GPUs.
#   docker build -t accelengine .
#   docker run --gpus all -v "$PWD/recipes:/recipes:ro" -v "$PWD/runs:/runs" accelengine run /recipes/digits.toml
# Multi-GPU: add launch flags before the module, e.g.
#   docker run --gpus all --entrypoint accelerate ... accelengine launch --multi_gpu --num_processes 4 -m accelengine run /recipes/r.toml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/runs/.cache/huggingface

WORKDIR /opt/accelengine
COPY pyproject.toml README.md ./
COPY accelengine ./accelengine
# torch comes from the base image (CUDA build); the extras add data, examples, TensorBoard and plots. What is
# installed is this source tree, whose dependency ranges live in pyproject.toml, hence no pins here.
# hadolint ignore=DL3013
RUN pip install ".[examples,tensorboard,plot]" \
    && useradd --create-home --uid 1000 trainer \
    && mkdir -p /recipes /runs \
    && chown trainer:trainer /runs

COPY --chown=trainer:trainer recipes /recipes

USER 1000:1000
WORKDIR /runs
VOLUME ["/runs"]

ENTRYPOINT ["accelerate", "launch", "-m", "accelengine"]
CMD ["run", "/recipes/digits.toml"]
