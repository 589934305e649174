# A LiteFS node: LiteFS, the example application and litefs-sidecar in one image. Build from the repository root:
#   docker build -f deploy/fly/node.Dockerfile -t litefs-node .
# fly.toml builds it for Fly.io; deploy/compose/docker-compose.yml builds it too and mounts its own configuration.
FROM python:3.11-slim

# fuse3 for the FUSE mount; ca-certificates for Consul (FLY_CONSUL_URL is https); sqlite3 to look around.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 ca-certificates sqlite3 \
    && rm -rf /var/lib/apt/lists/*

# LiteFS 0.5 is a static binary.
COPY --from=flyio/litefs:0.5 /usr/local/bin/litefs /usr/local/bin/litefs

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install . && rm -rf /src

COPY deploy/fly/litefs.yml /etc/litefs.yml
COPY deploy/fly/sidecar.toml /etc/litefs-sidecar/sidecar.toml
COPY --chmod=0755 deploy/fly/litefs-exec /usr/local/bin/litefs-exec
COPY deploy/fly/example_app.py /app/example_app.py
WORKDIR /app

# LiteFS is the main process: it mounts /litefs, joins the cluster, then runs litefs.yml's `exec` commands
# (the migration, then litefs-exec: the application and the sidecar).
ENTRYPOINT ["litefs", "mount"]
