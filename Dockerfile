# sdproxy in a container. Mount your configuration at /etc/sdproxy/config.toml:
#   docker run -p 7860:7860 -v "$PWD/config.toml:/etc/sdproxy/config.toml:ro" sdproxy
# SDPROXY_* environment variables override the file (see config.example.toml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDPROXY_SERVER__HOST=0.0.0.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdproxy ./sdproxy
RUN pip install --no-cache-dir . && rm -rf /src

# A fixed non-root uid, so a mounted autosave folder can be chowned to it on the host.
RUN groupadd --system --gid 10001 sdproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent sdproxy
USER 10001:10001
WORKDIR /

EXPOSE 7860
# sdproxy runs as PID 1 (exec form, no shell): it handles SIGTERM itself, finishes the
# requests in flight (up to 30 s) and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "sdproxy.ops.healthcheck"]
CMD ["sdproxy", "serve", "--config", "/etc/sdproxy/config.toml"]
