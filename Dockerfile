# Container image for loops-watcher.
#
# Two stages on the same pinned base: the first installs the project and exactly the runtime
# dependencies uv.lock names, with their hashes checked, into a virtual environment; the second
# copies only that environment. No compiler, cache, build tool or source tree reaches the
# runtime image.

FROM python:3.11.14-slim-bookworm AS build

# uv trusts the system's certificate store, as pip does: a build behind a proxy with its own
# certificate authority then needs only that authority in the base image.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_SYSTEM_CERTS=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/loops-watcher

# The same uv as the Makefile's UV_VERSION.
RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /src
# --locked fails the build when uv.lock does not match pyproject.toml. Dependencies first, so
# that a change to the code alone reuses their layer.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project --python /usr/local/bin/python3
# README.md is the project's `readme` and LICENSE its license file: the build needs both.
COPY README.md LICENSE ./
COPY watcher/ watcher/
RUN uv sync --locked --no-dev --no-editable --python /usr/local/bin/python3


FROM python:3.11.14-slim-bookworm

# The version is pyproject.toml's; tests/deploy/test_repository.py checks that the two agree.
LABEL org.opencontainers.image.title="loops-watcher" \
      org.opencontainers.image.description="Prometheus exporter for Baseten Loops sampler status" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

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
