#!/usr/bin/env bash
# A local rehearsal of a real deployment in containers: one coordinator and two hospitals, each
# in its own container of the hospital image, on a private container network, with TLS and node
# authentication, the hospitals' folders and data mounted read-only and their state in volumes.
#
#   .ci/deploy/rehearsal.sh prepare [FOLDER]  write FOLDER once: coordinator, 2 hospitals, data
#   .ci/deploy/rehearsal.sh up   [FOLDER]   prepare, then start the three containers
#   .ci/deploy/rehearsal.sh run  [FOLDER]   run the federation: 2 rounds of the tiny preset
#   .ci/deploy/rehearsal.sh down [FOLDER]   stop and remove the containers and the network
#   .ci/deploy/rehearsal.sh clean [FOLDER]  down, then delete FOLDER and the state volumes
#
# FOLDER (default runs/rehearsal) receives the coordinator folder, the two hospital folders and a
# synthetic CLIMB federation, all written by fedclimb inside the image, so their files belong to
# the image's user (uid 10001), as on a real host. Watch the containers with
# `podman logs -f fedclimb-rehearsal-hospital-a` (or -coordinator, -hospital-b).
#
# Needs the image first (see the Dockerfile), e.g. `.ci/container-check.sh --build-only`, which
# tags localhost/fedclimb-hospital:ci. Environment: IMAGE (default that tag), ENGINE (podman or
# docker; default podman), ROUNDS (default 2), STEPS (local steps per round, default 2).
# Run it as root, or as a user of rootless podman (it then uses `podman unshare` to give the
# folders to uid 10001 inside the user namespace). Where podman's defaults fail (see
# .ci/container-check.sh), export CONTAINERS_CONF=~/.cache/fedclimb-ci/containers.conf first.
set -euo pipefail

ENGINE="${ENGINE:-podman}"
IMAGE="${IMAGE:-localhost/fedclimb-hospital:ci}"
ROUNDS="${ROUNDS:-2}"
STEPS="${STEPS:-2}"
UID_IN_IMAGE=10001
PREFIX=fedclimb-rehearsal
NETWORK="$PREFIX"
COORDINATOR="$PREFIX-coordinator"
PORT=9092
HOSPITALS=(hospital-a hospital-b)

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "rehearsal: $*" >&2; exit 1; }
say() { echo "rehearsal: $*"; }

[ $# -ge 1 ] || usage
cmd="$1"
FOLDER="${2:-runs/rehearsal}"
case "$cmd" in prepare|up|run|down|clean) ;; *) usage ;; esac
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
mkdir -p "$FOLDER"
FOLDER="$(cd "$FOLDER" && pwd)"

give_to_image_user() {  # the image runs as uid 10001: it must own the folders it writes
  if [ "$(id -u)" = 0 ]; then
    chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$@"
  elif [ "$ENGINE" = podman ]; then
    podman unshare chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$@"
  else
    die "run it as root (the folders must belong to uid $UID_IN_IMAGE, the image's user)"
  fi
}

fedclimb_once() {  # fedclimb_once [engine run options...] -- fedclimb arguments...
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  "$ENGINE" run --rm --init --network none "${opts[@]}" "$IMAGE" "$@"
}

exists() { "$ENGINE" container inspect "$1" >/dev/null 2>&1; }

stop_all() {
  local name
  for name in "${HOSPITALS[@]/#/$PREFIX-}" "$COORDINATOR"; do
    if exists "$name"; then
      "$ENGINE" stop -t 30 "$name" >/dev/null && "$ENGINE" rm -v "$name" >/dev/null && say "stopped and removed $name"
    fi
  done
  if "$ENGINE" network inspect "$NETWORK" >/dev/null 2>&1; then "$ENGINE" network rm "$NETWORK" >/dev/null; fi
}

domains() {  # the dataset folders of both hospitals' data, as [a,b,...]
  local list
  list=$(find "$FOLDER/data" -mindepth 3 -maxdepth 3 -type d -printf '%f\n' | sort -u | paste -sd, -)
  echo "[$list]"
}

prepare() {
  "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1 \
    || die "image $IMAGE not found: build it first (.ci/container-check.sh --build-only, or podman build -t $IMAGE .)"

  if [ ! -f "$FOLDER/coordinator/coordinator.yaml" ]; then
    say "coordinator init (hospitals dial $COORDINATOR:$PORT)"
    mkdir -p "$FOLDER/coordinator"
    give_to_image_user "$FOLDER/coordinator"
    fedclimb_once -v "$FOLDER/coordinator:/coordinator" -- coordinator init /coordinator --address "$COORDINATOR:$PORT"
  fi
  if [ ! -f "$FOLDER/data/federation.json" ]; then
    say "synthetic data for two hospitals"
    mkdir -p "$FOLDER/data"
    give_to_image_user "$FOLDER/data"
    fedclimb_once -v "$FOLDER/data:/out" -- data synth /out --hospitals 2 --scale 0.25
  fi
  local i=0 h
  for h in "${HOSPITALS[@]}"; do
    if [ ! -f "$FOLDER/$h/hospital.yaml" ]; then
      say "hospital init $h (data hospital-$i, state in volume $PREFIX-state-$h)"
      mkdir -p "$FOLDER/$h"
      give_to_image_user "$FOLDER/$h"
      fedclimb_once -v "$FOLDER/$h:/hospital" -v "$FOLDER/data/hospital-$i:/data:ro" \
        -v "$FOLDER/coordinator/pki/ca.crt:/incoming/ca.crt:ro" -v "$PREFIX-state-$h:/state" -- \
        hospital init /hospital --coordinator "$COORDINATOR:$PORT" --ca /incoming/ca.crt --data /data \
        --state /state --name "$h"
    fi
    # Admitting a hospital = its public key file in the coordinator's hospitals/ folder.
    cp "$FOLDER/$h/$h.pub" "$FOLDER/coordinator/hospitals/$h.pub"
    i=$((i + 1))
  done
}

case "$cmd" in
  prepare)
    prepare
    say "prepared $FOLDER; next: $0 up $FOLDER (or REHEARSAL_DIR=$FOLDER podman-compose -f .ci/deploy/compose.yaml up -d)"
    ;;
  up)
    prepare
    "$ENGINE" network inspect "$NETWORK" >/dev/null 2>&1 || "$ENGINE" network create "$NETWORK" >/dev/null
    if ! exists "$COORDINATOR"; then
      # --tmpfs /state: the image's /state volume is the hospital's; the coordinator needs none.
      "$ENGINE" run -d --init --name "$COORDINATOR" --network "$NETWORK" --tmpfs /state \
        -v "$FOLDER/coordinator:/coordinator" "$IMAGE" coordinator start /coordinator >/dev/null
      say "started $COORDINATOR"
    fi
    for _ in $(seq 120); do
      "$ENGINE" logs "$COORDINATOR" 2>&1 | grep -q "SuperLink ready" && break
      [ "$("$ENGINE" container inspect -f '{{.State.Running}}' "$COORDINATOR")" = true ] \
        || { "$ENGINE" logs "$COORDINATOR" >&2; die "the coordinator container stopped"; }
      sleep 1
    done
    "$ENGINE" logs "$COORDINATOR" 2>&1 | grep -q "SuperLink ready" || die "the SuperLink was not ready within 120 s"
    i=0
    for h in "${HOSPITALS[@]}"; do
      if ! exists "$PREFIX-$h"; then
        "$ENGINE" run -d --init --name "$PREFIX-$h" --network "$NETWORK" \
          -v "$FOLDER/$h:/hospital:ro" -v "$FOLDER/data/hospital-$i:/data:ro" -v "$PREFIX-state-$h:/state" \
          "$IMAGE" >/dev/null
        say "started $PREFIX-$h"
      fi
      i=$((i + 1))
    done
    say "next: $0 run $FOLDER"
    ;;
  run)
    exists "$COORDINATOR" || die "$COORDINATOR is not running: $0 up $FOLDER first"
    "$ENGINE" exec "$COORDINATOR" fedclimb coordinator run /coordinator \
      "federation.rounds=$ROUNDS" "federation.domains=$(domains)" "train.steps=$STEPS"
    ;;
  down)
    stop_all
    ;;
  clean)
    stop_all
    for h in "${HOSPITALS[@]}"; do "$ENGINE" volume rm -f "$PREFIX-state-$h" >/dev/null 2>&1 || true; done
    if [ "$(id -u)" = 0 ] || [ "$ENGINE" != podman ]; then rm -rf "$FOLDER"; else podman unshare rm -rf "$FOLDER"; fi
    say "removed $FOLDER and the state volumes"
    ;;
esac
