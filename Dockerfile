# tidemill: one image for every process; the command picks the role
# (`migrate`, `worker`, `relay`, `scheduler`, `web`), see docker-compose.yml.
#
# bookworm pins the Debian release, so postgresql-client is 15, the same major version as the
# postgres:15 server: pg_dump output then restores into that server exactly.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIDEMILL_ENV=production \
    TIDEMILL_WEB_HOST=0.0.0.0 \
    TIDEMILL_DATA_DIR=/var/lib/tidemill

# pg_dump / pg_restore for backups and the restore drill.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/tidemill tidemill \
    && mkdir -p /var/lib/tidemill \
    && chown tidemill:tidemill /var/lib/tidemill

WORKDIR /app

# Dependencies first, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY alembic.ini ./
COPY cli ./cli
COPY core ./core
COPY db ./db
COPY workers ./workers
COPY pipelines ./pipelines
COPY schedules ./schedules
COPY web ./web
COPY apps ./apps
COPY bench ./bench
RUN pip install --no-cache-dir . \
    && rm -rf build *.egg-info

USER tidemill
EXPOSE 8000
ENTRYPOINT ["tidemill"]
CMD ["web"]
