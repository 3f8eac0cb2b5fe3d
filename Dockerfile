# Container image for loops-watcher.
#
# Two stages on the same pinned base: the first builds a wheel of the project and installs it,
# with its dependencies, into a virtual environment; the second copies only that environment.
# No compiler, pip cache or source tree reaches the runtime image.

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
RUN python -m venv /opt/loops-watcher

# README.md is the project's `readme`, so setuptools needs it to build the wheel.
COPY pyproject.toml README.md ./
COPY watcher/ watcher/
RUN /opt/loops-watcher/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
 && /opt/loops-watcher/bin/pip install --no-cache-dir /tmp/wheels/*.whl


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="loops-watcher" \
      org.opencontainers.image.description="Prometheus exporter for Baseten Loops sampler status"

# A fixed UID/GID, so Kubernetes' runAsUser and compose's user: can name it (deploy/ does).
# The state file's directory belongs to it: the one place the watcher writes.
RUN groupadd --gid 10001 loops-watcher \
 && useradd --no-log-init --uid 10001 --gid loops-watcher --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin loops-watcher \
 && mkdir -p /var/lib/loops-watcher \
 && chown 10001:10001 /var/lib/loops-watcher \
 && chmod 0750 /var/lib/loops-watcher

# Owned by root and left read-only for the service user; the .pyc files were compiled at
# install time, so nothing needs writing at run time and a read-only root filesystem works.
COPY --from=build /opt/loops-watcher /opt/loops-watcher

# Per-run state survives restarts in a volume (deploy/ mounts one; with a read-only root
# filesystem and no volume the watcher says so in its log and keeps state in memory).
ENV PATH="/opt/loops-watcher/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOOPS_WATCHER_STATE_FILE=/var/lib/loops-watcher/state.db
VOLUME ["/var/lib/loops-watcher"]

USER 10001:10001
EXPOSE 9877

# slim images have no curl; /healthz only reports whether the poll loop is alive, never the
# Baseten API's reachability. It assumes the default port: a changed --listen-address needs a
# matching HEALTHCHECK (Kubernetes ignores this one and uses the probes in deploy/kubernetes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9877/healthz', timeout=4)"]

ENTRYPOINT ["loops-watcher"]
