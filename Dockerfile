# cdc-hooks, installed from this repository: the installer, the relay and the debug receiver.
#   docker build -t cdc-hooks .    (docker-compose.yml builds it for you)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
# Every dependency ships manylinux wheels (psycopg[binary], google-re2): no compiler needed.
# The web extra: `cdc-hooks web` and `run --web` work in the container too.
RUN pip install '.[web]' \
    && useradd --system --create-home --shell /usr/sbin/nologin cdc

USER cdc
WORKDIR /home/cdc
ENTRYPOINT ["cdc-hooks"]
CMD ["--help"]
