# syntax=docker/dockerfile:1
# The Bedside aggregator. Build context: the repository root (its .dockerignore keeps everything
# but the package sources out):
#
#   docker build -f deploy/docker/aggregator.Dockerfile -t bedside-aggregator:0.1.0 .
#
# `bedside[aggregator]`: validates, aggregates and writes weights into the ONNX file with
# onnx.numpy_helper, evaluates with onnxruntime, accounts with dp-accounting. No torch: the
# federation's first model is exported elsewhere (`bedside models export`, the edge-train image)
# and named by `initial_model` in aggregator.toml.
#
# Its directory (aggregator.toml, signing key, the broker CA when it enrols devices, state.db,
# the model registry) is a volume at /var/lib/bedside; nothing secret is in the image. The
# default command serves /var/lib/bedside/aggregator.toml; any other runs as given, e.g.
#   docker compose exec aggregator bedside aggregator invite \
#       --config /var/lib/bedside/aggregator.toml --device-id clinic-3
# /etc/bedside/mosquitto is where the broker's configuration goes when Mosquitto runs beside it
# ([enrollment] broker_dir: the ACL and CRL are rewritten there at each enrollment).
#
# The base image is pinned by tag. For reproducible builds pin its digest as well, e.g.
#   FROM python:3.11-slim-trixie@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11-slim-trixie` prints it), and renew it with
# Debian's security updates.

FROM python:3.11-slim-trixie AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# -- build: the project's wheel ------------------------------------------------------------------
FROM python AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bedside/ bedside/
COPY models/ models/
COPY edge/ edge/
COPY aggregator/ aggregator/
COPY demo/ demo/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- build: /opt/bedside/venv with the aggregator extra (no pip in it; the build fails if torch
# got in, say through a new dependency) ------------------------------------------------------------
FROM python AS venv
COPY --from=wheel /wheels/ /wheels/
# DL3013 (pin versions): this is the project's own wheel; its dependencies get the ranges that
# pyproject.toml declares (the project has no lock file to install from yet).
# hadolint ignore=DL3013
RUN python -m venv --without-pip /opt/bedside/venv \
    && whl="$(echo /wheels/bedside-*.whl)" \
    && pip --python /opt/bedside/venv/bin/python install --no-cache-dir "${whl}[aggregator]" \
    && /opt/bedside/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# -- the image -------------------------------------------------------------------------------------
FROM python AS aggregator
LABEL org.opencontainers.image.title="bedside-aggregator" \
      org.opencontainers.image.description="Bedside aggregator: federated rounds, update validation, signed model versions" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bedside \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/bedside --no-create-home \
        --shell /usr/sbin/nologin bedside \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/bedside /etc/bedside/mosquitto
COPY --from=venv /opt/bedside/venv /opt/bedside/venv
COPY --chmod=0755 deploy/docker/healthcheck.sh /usr/local/bin/bedside-healthcheck
# matplotlib (the privacy report's plot) keeps its cache in /tmp: the root file system may be
# read-only.
ENV PATH=/opt/bedside/venv/bin:$PATH \
    HOME=/var/lib/bedside \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /var/lib/bedside
USER 10001:10001
# Healthy: its configuration loads and the federation has a model version (the service imports
# initial_model before it opens the endpoints). Local state only.
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
    CMD ["bedside-healthcheck", "aggregator", "/var/lib/bedside/aggregator.toml"]
CMD ["bedside", "aggregator", "serve", "--config", "/var/lib/bedside/aggregator.toml"]
