# The activities service. Build: docker build -t activities .  (docker-compose.yml uses it)
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY events ./events
COPY services ./services
COPY projections ./projections
COPY client ./client
RUN pip install .
RUN useradd --system --uid 10001 activities && mkdir -p /data && chown activities /data
USER activities
ENV ACTIVITIES_DATA_DIR=/data ACTIVITIES_HTTP_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["activities"]
CMD ["serve"]
