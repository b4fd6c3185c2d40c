# syntax=docker/dockerfile:1
# Two images from one file (see docker-compose.yml):
#   --target api     the API, migrations and the reaper: the service's dependencies only, no torch
#                    (the API never imports it; the build checks)
#   --target worker  the GPU worker: the default PyPI torch wheel, which bundles the CUDA runtime,
#                    so the host needs only the NVIDIA driver and the container toolkit
# Both run as the unprivileged user `jumpout` (uid 10001), from a virtual environment in /opt/venv.
#
# Build arguments (docker-compose.yml passes them from JUMPOUT_* variables). Their defaults are the
# public image and PyPI, so that on a box with internet the file builds as it is; on a machine
# without a registry, scripts/prepare-docker-host builds a Debian base image and serves the local
# wheels on loopback (the builds use host networking), and sets these:
#   PYTHON_IMAGE         the base: a Debian-like image with python3 3.11 and its venv module
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS
#                        where pip looks for packages (pip reads them from the environment;
#                        empty: not used)
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    JUMPOUT_HOME=/var/lib/jumpout \
    JUMPOUT_ARTIFACT_DIR=/var/lib/jumpout/artifacts \
    JUMPOUT_DATA_DIR=/var/lib/jumpout/data
# The named volumes mounted on these directories take their owner from the image when first used:
# created here, owned by jumpout, so that the non-root worker can write checkpoints.
RUN groupadd --system --gid 10001 jumpout \
    && useradd --system --uid 10001 --gid jumpout --home-dir /app --shell /usr/sbin/nologin jumpout \
    && mkdir -p /var/lib/jumpout/artifacts /var/lib/jumpout/data \
    && chown -R jumpout:jumpout /var/lib/jumpout \
    && python3 -m venv /opt/venv
WORKDIR /app

FROM base AS api
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
COPY pyproject.toml ./
# The `service` extra from pyproject.toml, without the library's own dependencies (torch): a
# layer that changes only when pyproject.toml does.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['service']))" > /tmp/requirements.txt \
    && pip install --quiet -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY jumpout ./jumpout
COPY jobstore ./jobstore
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
# Editable, so that migrations/ and alembic.ini stay next to the code that finds them. The check:
# the API and the reaper import, and torch is not in the image.
RUN pip install --quiet --no-deps -e . \
    && python -c "import importlib.util, api.main, worker.reaper; assert importlib.util.find_spec('torch') is None, 'torch in the API image'"
USER jumpout
EXPOSE 8000
CMD ["python", "-m", "uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
# The CUDA line of the torch wheel. Empty: PyPI's torch 2.14.1, a CUDA 13.0 build that needs
# NVIDIA driver >= 580.65.06 on the host. For an older driver, a wheel index of an older line,
# e.g. https://download.pytorch.org/whl/cu126 (driver >= 525.60.13); see docs/architecture.md.
# A worker whose driver is too old says so at start and takes no job (worker/devices.py).
ARG TORCH_INDEX_URL=
# A C compiler: Triton builds its kernel launcher with one at run time, and Inductor's CPU kernels
# need g++; without them every compile=true job failed. Writable compiler caches: the user's home
# (/app) is not writable (compose keeps them in a volume, so kernels survive a restart).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/jumpout/cache/triton /var/lib/jumpout/cache/inductor \
    && chown -R jumpout:jumpout /var/lib/jumpout/cache
ENV TRITON_CACHE_DIR=/var/lib/jumpout/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/jumpout/cache/inductor \
    XDG_CACHE_HOME=/var/lib/jumpout/cache
RUN pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml ./
# The library's dependencies and the `service` extra, in a layer that changes only when
# pyproject.toml does (not with the README or the code).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['service']))" > /tmp/requirements.txt \
    && pip install --quiet -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY jumpout ./jumpout
COPY jobstore ./jobstore
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --quiet --no-deps -e .
USER jumpout
CMD ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
