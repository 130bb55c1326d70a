# syntax=docker/dockerfile:1
# gruflow: one image for every process (worker, trainer, replay); the subcommand picks the role.
#   docker build -t gruflow .
#   docker run --rm -e GRUFLOW_BOOTSTRAP_SERVERS=kafka:9092 gruflow worker

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with CPU-only torch and gruflow, copied whole into the runtime stage
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/gruflow
ENV PATH=/opt/gruflow/bin:$PATH
# torch first, from the CPU index: the default wheel drags in several GB of CUDA libraries
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY state/ state/
COPY stream/ stream/
# pip keeps the CPU torch above: it already satisfies the project's requirement
RUN pip install --upgrade-strategy only-if-needed . \
    && python -c "import torch, faust, confluent_kafka, rocksdict; print('torch', torch.__version__)"
# gruflow's compiled helpers (the int8 top-K kernel, the output encoder), built here next to their source:
# the runtime stage has no compiler (model/native.py; CPUs without AVX-512 VNNI score with torch, same answers)
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && cd / && python -m model.native --prebuild  # from /: the installed package, not /src

# ---- runtime: slim base, non-root, no compilers. /models belongs to the gruflow user so that a
# named volume mounted there (docker-compose: the initial model) is writable without root.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gruflow" \
      org.opencontainers.image.description="Streaming, online-learning GRU4Rec recommender on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gruflow \
    && useradd --system --uid 10001 --gid gruflow --home-dir /home/gruflow --create-home \
       --shell /usr/sbin/nologin gruflow \
    && mkdir -p /var/lib/gruflow /models \
    && chown gruflow:gruflow /var/lib/gruflow /models
COPY --from=build /opt/gruflow /opt/gruflow
ENV PATH=/opt/gruflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRUFLOW_DATA_DIR=/var/lib/gruflow \
    GRUFLOW_WEB_HOST=0.0.0.0 \
    GRUFLOW_WEB_PORT=6066
WORKDIR /var/lib/gruflow
USER 10001:10001
VOLUME ["/var/lib/gruflow"]
EXPOSE 6066
# liveness only: /livez never depends on the broker, so a Kafka outage does not restart the container
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", \
         "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/livez' % os.environ['GRUFLOW_WEB_PORT'], timeout=4)"]
ENTRYPOINT ["gruflow"]
CMD ["worker"]
