# visionstream worker image (inference worker and ClickHouse sink; VS_ROLE picks).
#   docker build -t visionstream:local .
#   docker run --gpus all -e VS_KAFKA_BROKER=kafka://host:9092 visionstream:local
# docker-compose.yml builds and runs it next to Kafka and ClickHouse.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl: the compose health checks call http://localhost:<web port>/healthz
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY streams ./streams
COPY processors ./processors
COPY schemas ./schemas
# The locked versions, hash-checked, as scripts/setup installs them (the lock also holds
# the dev tools, a few MB beside PyTorch), then the package itself without a resolver run.
RUN pip install --require-hashes --no-deps -r requirements.lock \
    && pip install --no-deps --no-build-isolation . \
    && rm -rf /src/build /src/*.egg-info

RUN useradd --create-home --uid 10001 visionstream \
    && mkdir -p /data \
    && chown visionstream /data
USER visionstream
# Per-container state (Faust tables, local chDB fallback). An anonymous volume per
# container, so `--scale worker=N` replicas never share one RocksDB directory.
VOLUME ["/data"]
WORKDIR /data

ENV VS_STATE_DIR=/data/state \
    VS_LOG_FORMAT=json

# 6066: inference worker web port (/healthz); the sink uses 6067 (VS_ROLE=sink)
EXPOSE 6066 6067

CMD ["visionstream", "worker", "-l", "info"]
