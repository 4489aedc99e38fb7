FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY audit ./audit
COPY adapters ./adapters
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/bastion --create-home bastion \
 && mkdir -p /etc/bastion \
 && chown bastion /etc/bastion
COPY gateway/demo/policies /etc/bastion/policies

USER bastion
WORKDIR /var/lib/bastion
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["bastion"]
CMD ["serve", "--config", "/etc/bastion/config.yaml"]
