# One image for every Shoal service; the command picks the service:
#   docker run shoal services.router      (or services.worker, services.kvstore,
#   services.controller, services.controller.jobs for the Celery worker)
#
# Build arguments:
#   BASE_IMAGE   any Debian-like image with python3 (>= 3.11) and python3 -m venv
#                (default: the official python image)
#   TORCH_BUILD  the PyTorch build: cpu (default) or a CUDA tag such as cu128
#   TORCH_INDEX  where that build comes from (default: PyTorch's index for it)
# For CUDA:
#   docker build --build-arg BASE_IMAGE=<a CUDA 12.8 runtime image with python3.11> \
#                --build-arg TORCH_BUILD=cu128 .
# Only runtime packages (requirements.lock) go in; development tools live in
# requirements-dev.lock and stay out. tests/unit/test_image.py checks that every
# module an entrypoint imports is in the build context.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_BUILD=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_BUILD}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/shoal
WORKDIR /src
# The lock alone goes in before the ~1.7 GB dependency layer, so that only a change
# to it rebuilds that layer (pyproject.toml and README.md follow with the sources).
COPY requirements.lock ./
# torch from the index of the chosen build (its local version names the build); the rest from the lock.
RUN grep -E '^torch==' requirements.lock | sed -E "s/\+[a-z0-9]+$/+${TORCH_BUILD}/" > /tmp/torch.txt \
 && /opt/shoal/bin/pip install --no-deps --index-url "${TORCH_INDEX}" -r /tmp/torch.txt \
 && grep -vE '^torch==' requirements.lock > /tmp/rest.txt \
 && /opt/shoal/bin/pip install --no-deps -r /tmp/rest.txt
COPY shared shared
COPY services services
COPY protos protos
COPY cli cli
COPY simulator simulator
COPY pyproject.toml README.md ./
RUN /opt/shoal/bin/pip install --no-deps . \
 && /opt/shoal/bin/python -m cli tiny-model /opt/models/shoal-tiny-moe \
 && /opt/shoal/bin/python -m cli tiny-model /opt/models/shoal-tiny-moe-b --variant b

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 shoal \
 && useradd --system --uid 10001 --gid shoal --home-dir /home/shoal --create-home shoal \
 && mkdir -p /data /pki \
 && chown shoal:shoal /data /pki  # named volumes mounted here (the kvstore's disk tier, compose's certificates) start owned by shoal
COPY --from=build /opt/shoal /opt/shoal
COPY --from=build --chown=shoal:shoal /opt/models /models
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHOAL_LOG_FORMAT=json \
    SHOAL_WORKER_MODEL_PATH=/models/shoal-tiny-moe
USER 10001:10001
WORKDIR /home/shoal
ENTRYPOINT ["python", "-m"]
CMD ["services.router"]
