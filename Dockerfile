# syntax=docker/dockerfile:1
# Two images from one file (see docker-compose.yml):
#   --target api     the API, migrations and the reaper: the CPU build of torch (no CUDA runtime)
#   --target worker  the GPU worker: the default PyPI torch wheel, which bundles the CUDA runtime,
#                    so the host needs only the NVIDIA driver and the container toolkit
# Both run as the unprivileged user `jumpout` (uid 10001).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JUMPOUT_HOME=/var/lib/jumpout \
    JUMPOUT_ARTIFACT_DIR=/var/lib/jumpout/artifacts \
    JUMPOUT_DATA_DIR=/var/lib/jumpout/data
RUN groupadd --system --gid 10001 jumpout \
    && useradd --system --uid 10001 --gid jumpout --home-dir /app --shell /usr/sbin/nologin jumpout \
    && mkdir -p /var/lib/jumpout/artifacts /var/lib/jumpout/data \
    && chown -R jumpout:jumpout /var/lib/jumpout
WORKDIR /app

FROM base AS api
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY jumpout ./jumpout
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
# Editable, so that migrations/ and alembic.ini stay next to the code that finds them.
RUN pip install -e ".[service]"
USER jumpout
EXPOSE 8000
CMD ["python", "-m", "uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY jumpout ./jumpout
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e ".[service]"
USER jumpout
CMD ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
