# One image for every Shoal service; the command picks the service:
#   docker run shoal services.router      (or services.worker, services.kvstore,
#   services.controller, services.controller.jobs for the Celery worker)
#
# CPU PyTorch by default. For CUDA:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# (the CUDA base needs python3.11 installed; see docs/deploy.md).

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/shoal
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
# torch comes from the index matching the base image (CPU or CUDA); the rest from the lock.
RUN grep -E '^torch==' requirements.lock > /tmp/torch.txt \
 && /opt/shoal/bin/pip install --index-url "${TORCH_INDEX}" -r /tmp/torch.txt \
 && grep -vE '^torch==' requirements.lock > /tmp/rest.txt \
 && /opt/shoal/bin/pip install --no-deps -r /tmp/rest.txt
COPY shared shared
COPY services services
COPY protos protos
COPY cli cli
RUN /opt/shoal/bin/pip install --no-deps . \
 && /opt/shoal/bin/python -m cli tiny-model /opt/models/shoal-tiny-moe

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 shoal \
 && useradd --system --uid 10001 --gid shoal --home-dir /home/shoal --create-home shoal
COPY --from=build /opt/shoal /opt/shoal
COPY --from=build --chown=shoal:shoal /opt/models /models
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHOAL_LOG_FORMAT=json \
    SHOAL_WORKER_MODEL_PATH=/models/shoal-tiny-moe \
    SHOAL_ROUTER_MODEL_PATH=/models/shoal-tiny-moe
USER 10001:10001
WORKDIR /home/shoal
ENTRYPOINT ["python", "-m"]
CMD ["services.router"]
