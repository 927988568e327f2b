FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SDPROXY_SERVER__HOST=0.0.0.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdproxy ./sdproxy
RUN pip install --no-cache-dir . && rm -rf /src/build

RUN useradd --system --no-create-home sdproxy
USER sdproxy

EXPOSE 7860
# Mount your configuration at /etc/sdproxy/config.toml.
CMD ["sdproxy", "serve", "--config", "/etc/sdproxy/config.toml"]
