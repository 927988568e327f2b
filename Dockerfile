# sdproxy in a container. Mount your configuration at /etc/sdproxy/config.toml, and a volume
# at /var/lib/sdproxy to keep the benchmark results across containers:
#   docker run -p 7860:7860 -v "$PWD/config.toml:/etc/sdproxy/config.toml:ro" \
#     -v sdproxy-state:/var/lib/sdproxy sdproxy
# SDPROXY_* environment variables override the file (see config.example.toml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDPROXY_SERVER__HOST=0.0.0.0 \
    SDPROXY_BENCHMARK__STATE_DIR=/var/lib/sdproxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdproxy ./sdproxy
RUN pip install --no-cache-dir . && rm -rf /src

# A fixed non-root uid, so a mounted autosave folder can be chowned to it on the host.
# /var/lib/sdproxy is its writable state directory (benchmark results, sdproxy-state.json):
# /etc/sdproxy is mounted read-only, and env-only mode has no config folder at all. Created
# and chowned before VOLUME, so a new volume starts owned by uid 10001.
RUN groupadd --system --gid 10001 sdproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent sdproxy \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/sdproxy
VOLUME ["/var/lib/sdproxy"]
USER 10001:10001
WORKDIR /

EXPOSE 7860
# sdproxy runs as PID 1 (exec form, no shell): it handles SIGTERM itself, finishes the
# requests in flight (up to 30 s) and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "sdproxy.ops.healthcheck"]
CMD ["sdproxy", "serve", "--config", "/etc/sdproxy/config.toml"]
