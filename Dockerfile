# WalkRank server image: `walkrank serve` (and every other walkrank command) as a non-root user.
#
# The install is the README's setup, step for step (Makefile, target $(STAMP), which CI runs):
#   python -m pip install -r requirements.lock
#   python -m pip install --no-deps -e ./client -e .
# (less the load-test kit, which a server does not run) so the image runs exactly the versions the test suite passed with. The lock resolves torch to
# its CPU wheel through the pip indexes of the build machine: pass the same ones as build args
# (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL) when they are not PyPI's. No image is built in CI (its
# machines have no container engine); docs/deployment.md says how to build and run it.
#
#   docker build -t walkrank:0.1.0 .
#   docker run --rm -p 50051:50051 -v /srv/walkrank:/var/lib/walkrank walkrank:0.1.0 \
#       serve --config /var/lib/walkrank/walkrank.yaml

FROM python:3.11-slim-bookworm AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/walkrank/.venv
WORKDIR /opt/walkrank
COPY requirements.lock ./
RUN .venv/bin/python -m pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY protos protos
RUN .venv/bin/python -m pip install --no-deps -e ./client -e .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 walkrank \
    && useradd --system --uid 10001 --gid walkrank --home-dir /var/lib/walkrank \
       --create-home --shell /usr/sbin/nologin walkrank
# The editable install points at /opt/walkrank/server and /opt/walkrank/client: same paths.
COPY --from=build /opt/walkrank /opt/walkrank
COPY tenants /etc/walkrank/tenants
ENV PATH=/opt/walkrank/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba
USER 10001:10001
WORKDIR /var/lib/walkrank
EXPOSE 50051 9090
ENTRYPOINT ["walkrank"]
CMD ["serve", "--config", "/etc/walkrank/walkrank.yaml", "--drain-seconds", "5"]
