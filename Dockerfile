# litefs-sidecar: the sidecar (`run`), the backup server (`serve`) and the restore tools in one image.
#
#   docker build -t litefs-sidecar .
#   docker run --rm litefs-sidecar --help
#   docker run -v backups:/var/lib/litefs-sidecar -p 20203:20203 \
#       -e LITEFS_SIDECAR_SERVER_TOKENS="default $(openssl rand -hex 24)" litefs-sidecar serve --addr 0.0.0.0:20203
#
# The LiteFS node image (LiteFS + an application + the sidecar) is deploy/fly/node.Dockerfile.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install . && rm -rf /src

# /var/lib/litefs-sidecar is the default state directory of `run` and `serve` (engine state, pending uploads,
# file:// backups): mount a volume there. (No VOLUME instruction: Fly.io ignores it and Compose names its own.)
WORKDIR /
EXPOSE 20203

ENTRYPOINT ["litefs-sidecar"]
CMD ["--help"]
