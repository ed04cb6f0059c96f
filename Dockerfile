# adaptd: the streaming adaptation service, CPU-only.
#
#   docker build -t adaptd:local .
#   docker run --rm -p 8000:8000 -e ADAPTD_STORE__URL=redis://redis:6379/0 adaptd:local
#
# Configuration is by environment (ADAPTD_*, nested with "__") or a TOML file named by
# ADAPTD_CONFIG; see service/settings.py.

# --- build: a virtualenv holding CPU torch and the package -------------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CPU torch first, from the PyTorch CPU index, so that `pip install .` finds the requirement
# (torch>=2.3,<2.14) already satisfied and never pulls a multi-GB CUDA build from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
# pyproject.toml, README.md and the packages; .dockerignore keeps out tests, deploy, .venv, .git
COPY . .
RUN pip install . \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda"

# --- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ADAPTD_PORT=8000

RUN groupadd --gid 10001 adaptd \
    && useradd --create-home --uid 10001 --gid 10001 adaptd
COPY --from=build /opt/venv /opt/venv

# numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
USER 10001:10001
WORKDIR /home/adaptd

EXPOSE 8000

# liveness only (the process answers); readiness (model loaded, store answers) is GET /readyz.
# slim has no curl: urlopen raises on a refused connection or a non-2xx status, so python exits 1
# (unhealthy) with no shell around it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADAPTD_PORT', '8000'), timeout=4)"]

CMD ["adaptd", "serve", "--host", "0.0.0.0"]
