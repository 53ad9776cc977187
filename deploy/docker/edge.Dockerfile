# syntax=docker/dockerfile:1
# Bedside on a clinic device. Build context: the repository root (its .dockerignore keeps
# everything but the package sources out):
#
#   docker build -f deploy/docker/edge.Dockerfile -t bedside-edge:0.1.0 .
#   docker build -f deploy/docker/edge.Dockerfile --target edge-train -t bedside-edge-train:0.1.0 .
#
# Targets:
#   edge        (the default: the last stage) `bedside[edge]` only: ONNX inference, record store,
#               enrollment and the agent. No torch, no dp-accounting: the agent serves the model
#               and takes model releases, and declines training rounds.
#   edge-train  `bedside[edge,train]` with torch 2.13.0 from the CPU wheel index: a device that
#               also trains (DP-SGD) and keeps its privacy ledger. The compose demo's agents.
#   demo-init   edge-train plus the compose demo's one-shot set-up (deploy/docker/compose.yaml).
#
# The device's directory (agent.toml, keys, TLS, records, ledger, models) is a volume at
# /var/lib/bedside; nothing secret is in the image. Default command: bedside-agent-start
# (deploy/docker/agent-start.sh): enrol with $BEDSIDE_HOME/enroll.token on the first start, then
# run the agent. Any other command runs as given, e.g.
#   docker run --rm -v clinic:/var/lib/bedside bedside-edge:0.1.0 bedside edge infer \
#       --model /var/lib/bedside/data/models/FLEET/current --input /var/lib/bedside/in.csv
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

# -- build: /opt/bedside/venv with the edge extra (no pip in it: the image's pip installs into it;
# the build fails if torch got in, say through a new dependency) ---------------------------------
FROM python AS venv-edge
COPY --from=wheel /wheels/ /wheels/
# DL3013 (pin versions): this is the project's own wheel; its dependencies get the ranges that
# pyproject.toml declares (the project has no lock file to install from yet).
# hadolint ignore=DL3013
RUN python -m venv --without-pip /opt/bedside/venv \
    && whl="$(echo /wheels/bedside-*.whl)" \
    && pip --python /opt/bedside/venv/bin/python install --no-cache-dir "${whl}[edge]" \
    && /opt/bedside/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# -- build: the same venv with the train extra; torch pinned, from the CPU index (PyPI's default
# torch wheel is a CUDA build of several GB; the build fails if a CUDA build got in) -------------
FROM venv-edge AS venv-train
# hadolint ignore=DL3013
RUN pip --python /opt/bedside/venv/bin/python install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && whl="$(echo /wheels/bedside-*.whl)" \
    && pip --python /opt/bedside/venv/bin/python install --no-cache-dir "${whl}[edge,train]" \
    && /opt/bedside/venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

# -- runtime: what every edge image has ------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="bedside-edge" \
      org.opencontainers.image.description="Bedside on a clinic device: ONNX inference and the federated-learning agent" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bedside \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/bedside --no-create-home \
        --shell /usr/sbin/nologin bedside \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/bedside
COPY --chmod=0755 deploy/docker/agent-start.sh /usr/local/bin/bedside-agent-start
COPY --chmod=0755 deploy/docker/healthcheck.sh /usr/local/bin/bedside-healthcheck
ENV PATH=/opt/bedside/venv/bin:$PATH \
    HOME=/var/lib/bedside \
    BEDSIDE_HOME=/var/lib/bedside
WORKDIR /var/lib/bedside
USER 10001:10001
# Healthy: the agent has a verified model in service (read from its state; cheap, no network).
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
    CMD ["bedside-healthcheck", "agent", "/var/lib/bedside/agent.toml"]
CMD ["bedside-agent-start"]

FROM runtime AS edge-train
LABEL org.opencontainers.image.title="bedside-edge-train"
COPY --from=venv-train /opt/bedside/venv /opt/bedside/venv

# The compose demo's one-shot set-up. Its volumes' mount points exist here, owned by the
# service user, so that new named volumes mounted on them belong to that user.
FROM edge-train AS demo-init
LABEL org.opencontainers.image.title="bedside-demo-init"
USER 0:0
RUN install -d -o 10001 -g 10001 -m 0700 /var/lib/bedside-demo/aggregator \
        /var/lib/bedside-demo/clinic-1 /var/lib/bedside-demo/clinic-2 /etc/bedside/mosquitto
COPY deploy/docker/demo_init.py /opt/bedside/demo_init.py
ENV HOME=/tmp
USER 10001:10001
HEALTHCHECK NONE
CMD ["python", "/opt/bedside/demo_init.py"]

# The default target (the last stage): the slim edge image.
FROM runtime AS edge
COPY --from=venv-edge /opt/bedside/venv /opt/bedside/venv
