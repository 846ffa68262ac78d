# cdc-bridge container image.
#
#   docker build -t cdc-bridge:0.1.0 .
#   docker run --rm -v "$PWD/config.yaml:/etc/cdc-bridge/config.yaml:ro" \
#       -e CDC_BRIDGE_POSTGRES__PASSWORD=... -p 9187:9187 cdc-bridge:0.1.0
#
# Two stages: the builder turns the checkout into a wheel and installs it (with its
# dependencies, all binary wheels) into a virtualenv at /opt/cdc-bridge; the final
# stage is the same slim Python base with only that virtualenv copied in, running as
# an unprivileged user. See docs/operations.md.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): pyproject.toml names README.md.
COPY pyproject.toml README.md ./
COPY cdc_bridge ./cdc_bridge

# The wheel is built from this checkout, so its version is the checkout's; the
# dependencies are resolved within pyproject.toml's bounds at build time.
RUN python -m venv /opt/cdc-bridge \
    && python -m pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/cdc-bridge/bin/pip install /tmp/wheels/cdc_bridge-*.whl \
    && /opt/cdc-bridge/bin/cdc-bridge --version


FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cdc-bridge" \
      org.opencontainers.image.description="PostgreSQL logical replication (pgoutput) to NATS JetStream, confirming the slot only after PubAck" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV PATH=/opt/cdc-bridge/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid/gid (10001), so Kubernetes can check runAsNonRoot; no home
# directory, no shell. /etc/cdc-bridge is where the config file is mounted.
RUN groupadd --system --gid 10001 cdc-bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cdc-bridge \
    && mkdir -p /etc/cdc-bridge

COPY --from=builder /opt/cdc-bridge /opt/cdc-bridge

USER 10001:10001
WORKDIR /opt/cdc-bridge

# metrics.port (default 9187): /metrics, /livez, /readyz. The defaults serve them on
# 0.0.0.0; with `metrics.enabled: false` the HEALTHCHECK below reports unhealthy.
EXPOSE 9187

# No curl in the image: Python's urllib asks /livez (any non-2xx answer or no answer
# is a failure). CDC_BRIDGE_METRICS__PORT, if set, is the port the bridge uses too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('CDC_BRIDGE_METRICS__PORT', '9187'), timeout=4)"]

# SIGTERM stops reading WAL, waits up to shutdown_timeout for in-flight PubAcks and
# exits 0; give `docker stop -t` / terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cdc-bridge"]
CMD ["run", "--config", "/etc/cdc-bridge/config.yaml"]
