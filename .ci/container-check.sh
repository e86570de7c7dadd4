#!/usr/bin/env bash
# Container check: builds the hospital image from ./Dockerfile with podman and runs it for real.
# A SuperLink runs on this host (`fedclimb coordinator start`), one hospital container
# (`fedclimb hospital start`) joins it over TLS with its node key, and `fedclimb coordinator run`
# completes one round of the tiny preset. Everything it starts is stopped by PID / container id.
#
# Needs root (rootful podman) on Debian 12. It installs its own tools from Debian packages,
# caches the debootstrap base image under ~/.cache/fedclimb-ci (FEDCLIMB_CI_CACHE) and reuses
# podman's layer cache, so a second run only rebuilds what changed.
#
# The host's pip sources (index URLs, find-links; local folders are bind-mounted read-only into
# the build) and its locally added CA certificates (/usr/local/share/ca-certificates/*.crt, or
# the PEM files named in FEDCLIMB_CI_EXTRA_CA) are passed to the build, so the image installs
# the same packages the host can reach, through the same TLS-intercepting proxy if there is one.
#
# Environment: FEDCLIMB_CI_CACHE, FEDCLIMB_CI_TIMEOUT (seconds, default 1800),
# FEDCLIMB_CI_DEBIAN_MIRROR, FEDCLIMB_CI_BASE_MAX_AGE_DAYS (default 30), FEDCLIMB_CI_EXTRA_CA,
# FEDCLIMB_CI_KEEP=1 (keep the work folder for inspection).
# `--build-only`: stop after building the image.
set -euo pipefail
cd "$(dirname "$0")/.."

# The whole check runs under one timeout; on expiry the EXIT trap below still cleans up.
if [ -z "${_FEDCLIMB_CONTAINER_CHECK_TIMED:-}" ]; then
  export _FEDCLIMB_CONTAINER_CHECK_TIMED=1
  limit="${FEDCLIMB_CI_TIMEOUT:-1800}"
  rc=0
  timeout -k 120 "$limit" bash "$0" "$@" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "container check FAILED: did not finish within ${limit} s (FEDCLIMB_CI_TIMEOUT)" >&2
  fi
  exit "$rc"
fi

ROOT="$PWD"
VENV="$ROOT/.venv"
CACHE="${FEDCLIMB_CI_CACHE:-$HOME/.cache/fedclimb-ci}"
MIRROR="${FEDCLIMB_CI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_MAX_AGE_DAYS="${FEDCLIMB_CI_BASE_MAX_AGE_DAYS:-30}"
BASE_IMAGE=localhost/fedclimb-ci-debian-base:bookworm
BASE_TAR="$CACHE/debian-bookworm-minbase.tar"
IMAGE=localhost/fedclimb-hospital:ci
HOSPITAL_UID=10001
T0=$SECONDS

step() { echo "== container check [$((SECONDS - T0)) s] $*"; }
fail() { echo "container check FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run it as root (it installs Debian packages and runs rootful podman)"
[ -x "$VENV/bin/fedclimb" ] || fail "$VENV/bin/fedclimb is missing: run .ci/setup.sh first"
mkdir -p "$CACHE"

# ----------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------
TOOLS=(podman runc debootstrap netavark aardvark-dns catatonit iptables)
missing=()
for p in "${TOOLS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${TOOLS[@]}" >"$CACHE/apt-install.log" 2>&1 \
    || { tail -20 "$CACHE/apt-install.log" >&2; fail "apt-get install ${TOOLS[*]} failed (log: $CACHE/apt-install.log)"; }
fi

# podman's defaults do not work on every CI machine: crun cannot run on a cgroup v1/v2 hybrid and
# root may lack CAP_SYS_RESOURCE, so the default ulimits (nofile 1048576) cannot be set. runc with
# ulimits at or under the hard limits works; CONTAINERS_CONF keeps /etc/containers untouched.
nofile_hard=$(ulimit -Hn); nproc_hard=$(ulimit -Hu)
[ "$nofile_hard" = unlimited ] && nofile_hard=20000
[ "$nproc_hard" = unlimited ] && nproc_hard=32768
nofile=$(( nofile_hard < 20000 ? nofile_hard : 20000 ))
nproc=$(( nproc_hard < 32768 ? nproc_hard : 32768 ))
cat >"$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$CACHE/containers.conf"
podman info >/dev/null 2>"$CACHE/podman-info.err" || { cat "$CACHE/podman-info.err" >&2; fail "podman does not work here"; }

# ----------------------------------------------------------------------------------------------
# Base image: Debian bookworm by debootstrap (no registry needed), cached as a tarball
# ----------------------------------------------------------------------------------------------
if [ ! -s "$BASE_TAR" ] || [ -n "$(find "$BASE_TAR" -mtime +"$BASE_MAX_AGE_DAYS" 2>/dev/null)" ]; then
  step "debootstrap bookworm from $MIRROR (cached in $BASE_TAR)"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -20 "$CACHE/debootstrap.log" >&2
    rm -rf "$rootfs"
    fail "debootstrap failed (log: $CACHE/debootstrap.log)"
  fi
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.part" . || { rm -rf "$rootfs"; fail "could not write $BASE_TAR"; }
  mv "$BASE_TAR.part" "$BASE_TAR"
  rm -rf "$rootfs"
  podman image rm -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! podman image exists "$BASE_IMAGE"; then
  step "importing the base image $BASE_IMAGE"
  podman import --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null \
    || fail "podman import of $BASE_TAR failed"
fi

# ----------------------------------------------------------------------------------------------
# The hospital image
# ----------------------------------------------------------------------------------------------
# The host's pip sources, as pip options plus the local folders the build must see.
mapfile -t pip_lines < <("$VENV/bin/python" - <<'PY'
import os, shlex, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
values = {}
for line in out.splitlines():
    name, _, raw = line.partition("=")
    key = name.rsplit(".", 1)[-1]
    if key in ("index-url", "extra-index-url", "find-links"):
        val = raw.strip().strip("'\"")
        values.setdefault(key, [])
        for v in val.split():
            if v not in values[key]:
                values[key].append(v)
opts, mounts = [], []
for key in ("index-url", "extra-index-url", "find-links"):
    for v in values.get(key, [])[: 1 if key == "index-url" else None]:
        opts += [f"--{key}", v]
        path = v[len("file://"):] if v.startswith("file://") else v if v.startswith("/") else ""
        if path and key != "find-links":
            # A local index's pages usually link to files beside it (simple/../files/).
            path = os.path.dirname(path.rstrip("/"))
        if path and os.path.isdir(path) and path not in mounts:
            mounts.append(path)
print(shlex.join(opts))
print("\n".join(mounts))
PY
)
PIP_OPTIONS="${pip_lines[0]:-}"
build_volumes=()
for m in "${pip_lines[@]:1}"; do
  [ -n "$m" ] && build_volumes+=(--volume "$m:$m:ro")
done

extra_ca=""
if [ -n "${FEDCLIMB_CI_EXTRA_CA:-}" ]; then
  for f in $FEDCLIMB_CI_EXTRA_CA; do
    [ -r "$f" ] || fail "FEDCLIMB_CI_EXTRA_CA names $f, which cannot be read"
    extra_ca+="$(cat "$f")"$'\n'
  done
else
  for f in /usr/local/share/ca-certificates/*.crt; do
    [ -r "$f" ] && extra_ca+="$(cat "$f")"$'\n'
  done
fi

step "building $IMAGE (pip options: ${PIP_OPTIONS:-none}; $(grep -c 'BEGIN CERTIFICATE' <<<"$extra_ca" || true) extra CA certificates)"
old_image=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if ! podman build --network host -f Dockerfile -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg EXTRA_CA_CERTS="$extra_ca" \
    --build-arg PIP_OPTIONS="$PIP_OPTIONS" \
    --build-arg TORCH_INDEX_URL= \
    "${build_volumes[@]}" . >"$CACHE/build.log" 2>&1; then
  tail -40 "$CACHE/build.log" >&2
  fail "podman build of the hospital image failed (log: $CACHE/build.log)"
fi
new_image=$(podman image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_image" ] && [ "$old_image" != "$new_image" ]; then
  podman image rm "$old_image" >/dev/null 2>&1 || true
fi
# Untagged leftovers of earlier builds of this image (never other images).
podman image prune -f --filter label=org.opencontainers.image.title=fedclimb-hospital >/dev/null 2>&1 || true
step "image $IMAGE: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
if [ "${1:-}" = --build-only ]; then step "built (--build-only)"; exit 0; fi

# ----------------------------------------------------------------------------------------------
# The real check: a SuperLink on this host, a hospital container joining it over TLS
# ----------------------------------------------------------------------------------------------
WORK=$(mktemp -d -t fedclimb-container-check.XXXXXX)
NAME="ci-$$"
STATE_VOLUME="fedclimb-ci-state-$$"
coordinator_pid=""
hospital_cid=""
run_pid=""

stop_group() {  # stop_group PID: SIGTERM to its process group, then SIGKILL after 20 s
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  echo "process group $pid did not stop on SIGTERM; sending SIGKILL" >&2
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$run_pid" ]; then stop_group "$run_pid"; fi
  if [ -n "$hospital_cid" ]; then
    if [ "$rc" != 0 ]; then
      echo "---- hospital container log (last 60 lines)" >&2
      podman logs --tail 60 "$hospital_cid" >&2 2>&1
    fi
    podman stop -t 20 "$hospital_cid" >/dev/null 2>&1
    podman rm -f "$hospital_cid" >/dev/null 2>&1
  fi
  if [ -n "$coordinator_pid" ]; then stop_group "$coordinator_pid"; fi
  if [ "$rc" != 0 ] && [ -f "$WORK/coordinator.log" ]; then
    echo "---- coordinator log (last 60 lines)" >&2
    tail -60 "$WORK/coordinator.log" >&2
  fi
  podman volume rm -f "$STATE_VOLUME" >/dev/null 2>&1
  if [ "${FEDCLIMB_CI_KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK" >&2; else rm -rf "$WORK"; fi
  if [ "$rc" = 0 ]; then step "passed"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

export PATH="$VENV/bin:$PATH"
in_image() {  # in_image [podman run options...] -- fedclimb arguments...
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  podman run --rm --init --network none "${opts[@]}" "$IMAGE" "$@"
}

step "synthetic data, coordinator and hospital folders in $WORK"
fedclimb data synth "$WORK/data" --hospitals 2 --scale 0.25 >"$WORK/synth.log" 2>&1 \
  || { cat "$WORK/synth.log" >&2; fail "fedclimb data synth failed"; }
DATA="$WORK/data/hospital-0"
[ -d "$DATA" ] || fail "the synthetic federation has no $DATA"
chmod -R a+rX "$WORK/data"
# The federation's domains: the hospital's CLIMB dataset folders (<modality>/<dataset>).
DOMAINS=$(find "$DATA" -mindepth 2 -maxdepth 2 -type d -printf '%f\n' | sort | paste -sd, -)
[ -n "$DOMAINS" ] || fail "no dataset folders under $DATA"

PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fedclimb coordinator init "$WORK/coordinator" --address "127.0.0.1:$PORT" >"$WORK/coordinator-init.log" 2>&1 \
  || { cat "$WORK/coordinator-init.log" >&2; fail "fedclimb coordinator init failed"; }
[ -s "$WORK/coordinator/pki/ca.crt" ] || fail "coordinator init wrote no pki/ca.crt"

# The hospital folder is written by `hospital init` inside the image, so its files belong to
# the image's user (uid $HOSPITAL_UID), as they will on a hospital's host.
mkdir -p "$WORK/hospital" "$WORK/incoming"
cp "$WORK/coordinator/pki/ca.crt" "$WORK/incoming/ca.crt"
chmod 0644 "$WORK/incoming/ca.crt"
chown "$HOSPITAL_UID:$HOSPITAL_UID" "$WORK/hospital"
podman volume create "$STATE_VOLUME" >/dev/null
in_image -v "$WORK/hospital:/hospital" -v "$WORK/incoming:/incoming:ro" -v "$DATA:/data:ro" \
  -v "$STATE_VOLUME:/state" -- \
  hospital init /hospital --coordinator "127.0.0.1:$PORT" --ca /incoming/ca.crt --data /data --state /state \
  --name "$NAME" \
  >"$WORK/hospital-init.log" 2>&1 \
  || { cat "$WORK/hospital-init.log" >&2; fail "fedclimb hospital init (in the image) failed"; }
[ -s "$WORK/hospital/$NAME.pub" ] || fail "hospital init wrote no $NAME.pub"
[ "$(stat -c %u:%a "$WORK/hospital/node_key")" = "$HOSPITAL_UID:600" ] \
  || fail "node_key should be owned by uid $HOSPITAL_UID with mode 600, is $(stat -c %u:%a "$WORK/hospital/node_key")"
cp "$WORK/hospital/$NAME.pub" "$WORK/coordinator/hospitals/$NAME.pub"
# The hospital approves the app of the image's fedclimb; the coordinator ships the checkout's.
image_app=$(sed -n 's/.*approved app: \(sha256:[0-9a-f]*\).*/\1/p' "$WORK/hospital-init.log")
host_app=$("$VENV/bin/python" -c 'from common.fab import installed_app_digest; print(installed_app_digest())')
[ -n "$image_app" ] && [ "$image_app" = "$host_app" ] \
  || fail "the image's app ($image_app) is not this checkout's ($host_app): files changed during the build? run it again"

step "coordinator start on 127.0.0.1:$PORT (TLS, node authentication)"
setsid fedclimb coordinator start "$WORK/coordinator" >"$WORK/coordinator.log" 2>&1 &
coordinator_pid=$!
for i in $(seq 120); do
  kill -0 "$coordinator_pid" 2>/dev/null || fail "fedclimb coordinator start exited early"
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.5
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || fail "the SuperLink did not listen on 127.0.0.1:$PORT within 60 s"

step "hospital container (hospital start, --init, /hospital and /data read-only, /state volume)"
hospital_cid=$(podman run -d --init --network host --name "fedclimb-ci-hospital-$$" \
  -v "$WORK/hospital:/hospital:ro" -v "$DATA:/data:ro" -v "$STATE_VOLUME:/state" "$IMAGE") \
  || fail "podman run of the hospital container failed"

step "coordinator run: one round of the tiny preset"
setsid fedclimb coordinator run "$WORK/coordinator" federation.rounds=1 "federation.domains=[$DOMAINS]" \
  train.steps=2 federation.connect_timeout_s=180 >"$WORK/run.log" 2>&1 &
run_pid=$!
run_t0=$SECONDS
while kill -0 "$run_pid" 2>/dev/null; do
  [ "$(podman inspect -f '{{.State.Running}}' "$hospital_cid" 2>/dev/null)" = true ] || {
    cat "$WORK/run.log"; fail "the hospital container stopped during the run"; }
  [ $((SECONDS - run_t0)) -lt 900 ] || { cat "$WORK/run.log"; fail "the round did not complete within 900 s"; }
  sleep 2
done
run_rc=0
wait "$run_pid" || run_rc=$?
run_pid=""
cat "$WORK/run.log"
[ "$run_rc" = 0 ] || fail "fedclimb coordinator run exited with $run_rc"

podman logs "$hospital_cid" >"$WORK/hospital-container.log" 2>&1 || true
echo "---- the hospital's own account (its lines of the container log)"
grep 'fedclimb hospital' "$WORK/hospital-container.log" || true
grep -q "fedclimb hospital $NAME: round 1 train: .*status ok" "$WORK/hospital-container.log" \
  || fail "the hospital container's log has no 'round 1 train: ... status ok' line"

step "stopping the hospital container (SIGTERM through --init)"
stop_t0=$SECONDS
podman stop -t 30 "$hospital_cid" >/dev/null || fail "podman stop of the hospital container failed"
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$hospital_cid")
[ "$exit_code" = 0 ] || fail "the hospital container exited with $exit_code on SIGTERM (expected 0: a clean stop)"
echo "stopped cleanly in $((SECONDS - stop_t0)) s"
podman rm "$hospital_cid" >/dev/null
hospital_cid=""

step "the privacy ledger outlives the container (read from the volume by a new one)"
in_image -v "$STATE_VOLUME:/state:ro" -- privacy report --state /state >"$WORK/ledger.txt" 2>&1 \
  || { cat "$WORK/ledger.txt" >&2; fail "fedclimb privacy report on the state volume failed in a new container"; }
cat "$WORK/ledger.txt"
grep -q dpsgd "$WORK/ledger.txt" || fail "the ledger read back from the state volume has no dpsgd (training) entry"
