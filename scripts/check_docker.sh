#!/usr/bin/env bash
# Build the volunteer CPU image and run it for real, on this machine, as root:
#   sudo bash scripts/check_docker.sh
#
#   engine   start a Docker engine if none answers (installs Debian's docker.io if missing;
#            dockerd --bridge=none --iptables=false: containers get host networking only)
#   base     a local Debian bookworm base image (debootstrap from this machine's apt mirror), for
#            machines that cannot pull python:3.11-slim from Docker Hub
#   build    the CPU image, torch from the local wheel pip uses here, pip's CA bundle as a secret
#   pair     a containerized node (/data volume) and a node on the host form a 2-node swarm on
#            127.0.0.1 and each trains on the other's verified rollouts
#   health   the container's HEALTHCHECK reports healthy; `swarmnode status --node` reads it
#   restart  stop + start the container: same peer id, training resumes from its checkpoint
#   compose  docker/compose.swarm.yaml: 3 nodes (host networking) see each other in `swarmnode net`
#   cleanup  removes the containers, volumes, host node and dockerd it started; results in
#            bench/results/docker.json (build time, image size, each check's outcome).
#
# On failure it prints one line naming the step, exits 1, and still cleans up and writes the JSON.
# Logs of every step stay in the work directory it prints (CHECK_DOCKER_KEEP=1 keeps it on success).
#
# Settings (environment): BASE_IMAGE (default: build swarmnode-base:bookworm here), IMAGE
# (swarmnode:cpu), PAIR_ROUNDS (rounds the container trains before the restart, default 6),
# CHECK_TIMEOUT_S (longest wait of any one step, default 600).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

IMAGE="${IMAGE:-swarmnode:cpu}"
LOCAL_BASE="swarmnode-base:bookworm"
BASE_IMAGE="${BASE_IMAGE:-}"
TORCH_VERSION="2.13.0"
PAIR_ROUNDS="${PAIR_ROUNDS:-6}"
CHECK_TIMEOUT_S="${CHECK_TIMEOUT_S:-600}"
RESULTS="$REPO/bench/results/docker.json"
HOST_PY="$REPO/.venv/bin/python"
HOST_SWARMNODE="$REPO/.venv/bin/swarmnode"
CONTAINER="swarmnode-check-node"
VOLUME="swarmnode-check-data"
PROJECT="swarmnode-check"
WORK="$(mktemp -d /tmp/swarmnode-check-docker.XXXXXX)"

step="setup"
started_dockerd_pid=""
host_node_pid=""
wheel_copy=""
compose_up=0
declare -A outcome=()   # check -> "passed" | "failed" | "skipped"
declare -A detail=()    # check -> JSON value (number, string or object) with what was measured
build_seconds=""
image_bytes=""

say() { echo "check_docker: $*" >&2; }
fail() {  # the one line that says what failed; the EXIT trap cleans up and writes the results
    outcome[$step]="failed"
    say "FAILED at step '$step': $*  (logs: $WORK)"
    exit 1
}

json_str() { "$HOST_PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

free_port() {  # a TCP port free on 127.0.0.1 right now
    "$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...: poll every 2 s, fail the step on timeout
    local limit="$1" what="$2" waited=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((waited >= limit)); then
            fail "$what not reached in ${limit}s"
        fi
        sleep 2
        waited=$((waited + 2))
    done
}

# -- cleanup and results -------------------------------------------------------------------------
write_results() {
    local rc="$1" checks="" name
    for name in engine base build pair health restart compose; do
        checks+="$(json_str "$name"): {\"outcome\": $(json_str "${outcome[$name]:-skipped}")"
        [[ -n "${detail[$name]:-}" ]] && checks+=", \"measured\": ${detail[$name]}"
        checks+="},"
    done
    "$HOST_PY" - "$RESULTS" "$rc" "$step" "{${checks%,}}" "${build_seconds:-null}" "${image_bytes:-null}" \
        "${DOCKER_VERSION:-}" "${BASE_IMAGE:-}" <<'PY'
import json, platform, sys, time

out, rc, step, checks, build_s, image_bytes, docker_version, base = sys.argv[1:9]
result = {
    "what": "scripts/check_docker.sh: the CPU volunteer image built and run for real",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": f"{platform.system()} {platform.machine()}",
    "docker_server_version": docker_version or None,
    "base_image": base or None,
    "passed": rc == "0",
    "failed_step": None if rc == "0" else step,
    "build_seconds": json.loads(build_s),
    "image_bytes": json.loads(image_bytes),
    "checks": json.loads(checks),
}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
PY
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT
    if ((compose_up)); then
        "${COMPOSE[@]}" -f docker/compose.swarm.yaml -p "$PROJECT" down -v --timeout 30 \
            >>"$WORK/compose-down.log" 2>&1
    fi
    if [[ -n "${DOCKER:-}" ]] && "$DOCKER" info >/dev/null 2>&1; then
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
        "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1
    fi
    if [[ -n "$host_node_pid" ]] && kill -0 "$host_node_pid" 2>/dev/null; then
        kill -TERM "$host_node_pid"
        for _ in $(seq 1 30); do kill -0 "$host_node_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$host_node_pid" 2>/dev/null
    fi
    [[ -n "$wheel_copy" ]] && rm -f "$wheel_copy"
    if [[ -n "$started_dockerd_pid" ]]; then
        kill -TERM "$started_dockerd_pid" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$started_dockerd_pid" 2>/dev/null || break; sleep 1; done
    fi
    write_results "$rc"
    if ((rc == 0)); then
        say "all checks passed; results in ${RESULTS#"$REPO"/}"
        [[ "${CHECK_DOCKER_KEEP:-0}" == "1" ]] || rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

[[ "$(id -u)" == "0" ]] || fail "run as root (it starts dockerd and builds images)"
[[ -x "$HOST_SWARMNODE" ]] || fail "no $HOST_SWARMNODE: run bash scripts/setup.sh first"
say "work directory $WORK"

# -- engine --------------------------------------------------------------------------------------
step="engine"
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
    >>"$WORK/apt.log" 2>&1 || fail "apt-get install $* failed"; }
if ! command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    say "installing Debian's docker.io"
    apt_install docker.io
fi
# BuildKit (needed for the pip_cert secret) comes with Debian's docker client; a newer client
# without the buildx plugin refuses DOCKER_BUILDKIT=1, so prefer the one that can build.
DOCKER="docker"
if ! docker buildx version >/dev/null 2>&1 && [[ -x /usr/bin/docker ]]; then
    DOCKER="/usr/bin/docker"
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    say "starting dockerd --bridge=none --iptables=false"
    dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
    started_dockerd_pid=$!
    wait_until 60 "dockerd answering on its socket" "$DOCKER" info
fi
DOCKER_VERSION="$("$DOCKER" version --format '{{.Server.Version}}')"
if "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose
    COMPOSE=(docker-compose)
fi
detail[engine]="{\"server\": $(json_str "$DOCKER_VERSION"), \"started_here\": $([[ -n "$started_dockerd_pid" ]] && echo true || echo false), \"compose\": $(json_str "$("${COMPOSE[@]}" version --short 2>/dev/null || echo unknown)")}"
outcome[engine]="passed"

# -- base ----------------------------------------------------------------------------------------
step="base"
if [[ -z "$BASE_IMAGE" ]]; then
    BASE_IMAGE="$LOCAL_BASE"
    if ! "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        mirror="$(grep -rhoE '^(URIs:|deb)\s+https?://[^ ]+/debian/?(\s|$)' /etc/apt/sources.list \
            /etc/apt/sources.list.d/ 2>/dev/null | awk '{print $2}' | head -n1 || true)"
        [[ -n "$mirror" ]] || mirror="http://deb.debian.org/debian"
        say "building $LOCAL_BASE with debootstrap from $mirror (about 2 minutes)"
        base_start=$SECONDS
        rootfs="$WORK/rootfs"
        nice -n 10 debootstrap --variant=minbase --include=python3.11,ca-certificates bookworm \
            "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap from $mirror failed"
        cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
        chroot "$rootfs" /bin/sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends python3-venv && apt-get clean && rm -rf /var/lib/apt/lists/*' \
            >>"$WORK/debootstrap.log" 2>&1 || fail "apt-get install python3-venv in the base rootfs failed"
        : >"$rootfs/etc/resolv.conf"
        tar -C "$rootfs" -c . | "$DOCKER" import - "$LOCAL_BASE" >>"$WORK/debootstrap.log" 2>&1 \
            || fail "docker import of the base rootfs failed"
        rm -rf "$rootfs"
        detail[base]="{\"image\": $(json_str "$LOCAL_BASE"), \"seconds\": $((SECONDS - base_start))}"
    else
        detail[base]="{\"image\": $(json_str "$LOCAL_BASE"), \"reused\": true}"
    fi
    outcome[base]="passed"
fi

# -- build ---------------------------------------------------------------------------------------
step="build"
# The torch wheel pip uses on this machine (the +cpu build from a local find-links directory),
# copied into the build context's wheelhouse for the duration of the build.
"$REPO/.venv/bin/pip" download --no-deps --only-binary :all: --dest "$WORK/wheels" \
    "torch==$TORCH_VERSION" >"$WORK/pip-download.log" 2>&1 || fail "pip download torch==$TORCH_VERSION failed"
wheel="$(find "$WORK/wheels" -name "torch-$TORCH_VERSION*.whl" | head -n1)"
[[ "$wheel" == *+cpu* ]] || fail "pip found no CPU torch wheel here (got: ${wheel:-none}); see $WORK/pip-download.log"
wheel_copy="$REPO/docker/wheelhouse/$(basename "$wheel")"
mv "$wheel" "$wheel_copy"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
pip_cert="${PIP_CERT:-$("$REPO/.venv/bin/pip" config get global.cert 2>/dev/null || true)}"
if [[ -n "$pip_cert" && -s "$pip_cert" ]]; then
    build_args+=(--secret "id=pip_cert,src=$pip_cert")
fi
say "building $IMAGE from $BASE_IMAGE (several minutes)"
build_start=$SECONDS
DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build --progress plain --network host "${build_args[@]}" \
    -f docker/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || fail "docker build failed: $(grep -m1 -E 'fatal error|ERROR: ' "$WORK/build.log" || tail -n1 "$WORK/build.log")"
build_seconds=$((SECONDS - build_start))
rm -f "$wheel_copy"
wheel_copy=""
image_bytes="$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")"
torch_in_image="$("$DOCKER" run --rm --network host --entrypoint python "$IMAGE" -c \
    'import torch; print(torch.__version__)' 2>>"$WORK/build.log")" || fail "torch does not import in the image"
[[ "$torch_in_image" == "$TORCH_VERSION+cpu" ]] || fail "image has torch $torch_in_image, wanted $TORCH_VERSION+cpu"
detail[build]="{\"seconds\": $build_seconds, \"image_bytes\": $image_bytes, \"torch\": $(json_str "$torch_in_image")}"
outcome[build]="passed"

# -- pair ----------------------------------------------------------------------------------------
step="pair"
host_dir="$WORK/host-node"
mkdir -p "$host_dir"
host_p2p="$(free_port)"; host_admin="$(free_port)"; host_metrics="$(free_port)"
box_p2p="$(free_port)"; box_admin="$(free_port)"; box_metrics="$(free_port)"
host_id="$("$HOST_PY" -c 'import sys; from swarmnode.identity import Identity
print(Identity.load_or_create(sys.argv[1]).peer_id)' "$host_dir/identity.key")"
OMP_NUM_THREADS=1 nice -n 10 "$HOST_SWARMNODE" run --config configs/cpu-tiny.toml --data-dir "$host_dir" \
    --name host-node --rounds 400 --listen "/ip4/127.0.0.1/tcp/$host_p2p" \
    --set "admin.listen=127.0.0.1:$host_admin" --set "admin.metrics_listen=127.0.0.1:$host_metrics" \
    >"$WORK/host-node.log" 2>&1 &
host_node_pid=$!

# More rounds than the checks need (a tiny-model round takes about a second): the checks stop it.
container_rounds=400
run_container() {
    "$DOCKER" run -d --name "$CONTAINER" --network host -v "$VOLUME:/data" \
        -e SWARMNODE_CONFIG=/opt/swarmnode/configs/cpu-tiny.toml \
        -e SWARMNODE_NAME=container-node \
        -e "SWARMNODE_LISTEN=/ip4/127.0.0.1/tcp/$box_p2p" \
        -e "SWARMNODE_ADMIN_ADDR=127.0.0.1:$box_admin" \
        -e "SWARMNODE_METRICS_ADDR=127.0.0.1:$box_metrics" \
        -e "SWARMNODE_BOOTSTRAP=/ip4/127.0.0.1/tcp/$host_p2p/p2p/$host_id" \
        -e "SWARMNODE_ROUNDS=$container_rounds" \
        -e SWARMNODE__CHECKPOINT_EVERY=2 \
        "$IMAGE" >>"$WORK/container.log" 2>&1
}
run_container || fail "docker run of $IMAGE failed"
box_data="$("$DOCKER" volume inspect -f '{{.Mountpoint}}' "$VOLUME")"

exchanged() {  # exchanged METRICS_FILE PEER_ID: a round accepted groups and trained on that peer's
    "$HOST_PY" - "$1" "$2" <<'PY'
import json, sys

path, peer = sys.argv[1:3]
ok = False
try:
    for line in open(path):
        m = json.loads(line)
        if m.get("accepted", 0) > 0 and m.get("used_by_source", {}).get(peer, 0) > 0:
            ok = True
except (OSError, ValueError):
    pass
sys.exit(0 if ok else 1)
PY
}
box_id_from_key() {
    "$HOST_PY" -c 'import sys; from swarmnode.identity import Identity
print(Identity.load(sys.argv[1]).peer_id)' "$box_data/identity.key"
}
wait_until 300 "the container node's identity key" test -s "$box_data/identity.key"
box_id="$(box_id_from_key)"
wait_until "$CHECK_TIMEOUT_S" "host node training on the container's rollouts" \
    exchanged "$host_dir/metrics.jsonl" "$box_id"
wait_until "$CHECK_TIMEOUT_S" "container node training on the host's rollouts" \
    exchanged "$box_data/metrics.jsonl" "$host_id"
sum_used() {  # total groups from PEER used in METRICS_FILE
    "$HOST_PY" -c 'import json, sys
print(sum(json.loads(l).get("used_by_source", {}).get(sys.argv[2], 0) for l in open(sys.argv[1])))' "$1" "$2"
}
detail[pair]="{\"host_used_from_container\": $(sum_used "$host_dir/metrics.jsonl" "$box_id"), \"container_used_from_host\": $(sum_used "$box_data/metrics.jsonl" "$host_id"), \"container_peer_id\": $(json_str "$box_id")}"
outcome[pair]="passed"

# -- health --------------------------------------------------------------------------------------
step="health"
healthy() { [[ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER")" == "healthy" ]]; }
wait_until 240 "HEALTHCHECK healthy" healthy
"$HOST_SWARMNODE" status --json --node "127.0.0.1:$box_admin" >"$WORK/status-before.json" 2>>"$WORK/status.log" \
    || fail "swarmnode status --node 127.0.0.1:$box_admin from the host failed"
status_field() { "$HOST_PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
[[ "$(status_field "$WORK/status-before.json" peer_id)" == "$box_id" ]] \
    || fail "status from the host names another peer id than the container's key"
detail[health]="{\"health\": \"healthy\", \"status_round\": $(status_field "$WORK/status-before.json" round)}"
outcome[health]="passed"

# -- restart -------------------------------------------------------------------------------------
step="restart"
round_reached() {  # round_reached ADMIN_PORT N: the node's status says round >= N
    "$HOST_SWARMNODE" status --json --node "127.0.0.1:$1" >"$WORK/status-probe.json" 2>/dev/null \
        && (($(status_field "$WORK/status-probe.json" round) >= $2))
}
wait_until "$CHECK_TIMEOUT_S" "container round $PAIR_ROUNDS" round_reached "$box_admin" "$PAIR_ROUNDS"
# docker stop sends SIGTERM: the node finishes its round and checkpoints before exiting.
"$DOCKER" stop -t 120 "$CONTAINER" >>"$WORK/container.log" 2>&1 || fail "docker stop failed"
"$DOCKER" logs "$CONTAINER" >"$WORK/container-run1.log" 2>&1
stopped_round="$(find "$box_data/checkpoints" -maxdepth 1 -name 'round-*' -printf '%f\n' 2>/dev/null \
    | sed -E 's/^round-0*([0-9])/\1/' | sort -n | tail -n1)"
if ! [[ "$stopped_round" =~ ^[0-9]+$ ]] || ((stopped_round < PAIR_ROUNDS)); then
    fail "no checkpoint at round >= $PAIR_ROUNDS in the volume after docker stop (got '${stopped_round}')"
fi
restart_time="$(date +%s)"
"$DOCKER" start "$CONTAINER" >>"$WORK/container.log" 2>&1 || fail "docker start failed"
resumed() {  # the round after the checkpoint was trained after the restart, the one before it before
    "$HOST_PY" - "$box_data/metrics.jsonl" "$stopped_round" "$restart_time" <<'PY'
import json, sys

path, stopped, restart = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
times = {}
for line in open(path):
    m = json.loads(line)
    times[m["round"]] = m["time"]
ok = stopped in times and times[stopped] > restart and times.get(stopped - 1, restart) < restart
sys.exit(0 if ok else 1)
PY
}
wait_until "$CHECK_TIMEOUT_S" "a round after the restart continuing from round $stopped_round" resumed
"$HOST_SWARMNODE" status --json --node "127.0.0.1:$box_admin" >"$WORK/status-after.json" 2>>"$WORK/status.log" \
    || fail "swarmnode status --node 127.0.0.1:$box_admin failed after the restart"
[[ "$(status_field "$WORK/status-after.json" peer_id)" == "$box_id" ]] || fail "peer id changed across the restart"
detail[restart]="{\"peer_id_kept\": true, \"checkpoint_round_at_stop\": $stopped_round, \"round_after_restart\": $(status_field "$WORK/status-after.json" round)}"
outcome[restart]="passed"
"$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
kill -TERM "$host_node_pid" 2>/dev/null || true

# -- compose -------------------------------------------------------------------------------------
step="compose"
declare -a admin_ports=()
for i in 0 1 2; do
    export "SWARMNODE_P2P_PORT_$i=$(free_port)" "SWARMNODE_METRICS_PORT_$i=$(free_port)"
    admin_ports[i]="$(free_port)"
    export "SWARMNODE_ADMIN_PORT_$i=${admin_ports[i]}"
done
export SWARMNODE_ROUNDS=400
compose_up=1
"${COMPOSE[@]}" -f docker/compose.swarm.yaml -p "$PROJECT" up -d --no-build >"$WORK/compose.log" 2>&1 \
    || fail "compose up failed: $(tail -n1 "$WORK/compose.log")"
sees_all() {  # every node's own id + its `swarmnode net` view cover the 3 nodes
    local i
    for i in 0 1 2; do
        "$HOST_SWARMNODE" status --json --node "127.0.0.1:${admin_ports[i]}" >"$WORK/c-status-$i.json" \
            && "$HOST_SWARMNODE" net --json --node "127.0.0.1:${admin_ports[i]}" >"$WORK/c-net-$i.json" || return 1
    done
    "$HOST_PY" - "$WORK" <<'PY'
import json, sys

work = sys.argv[1]
own = [json.load(open(f"{work}/c-status-{i}.json"))["peer_id"] for i in range(3)]
seen = [{n["peer_id"] for n in json.load(open(f"{work}/c-net-{i}.json"))} | {own[i]} for i in range(3)]
sys.exit(0 if len(set(own)) == 3 and all(s >= set(own) for s in seen) else 1)
PY
}
wait_until "$CHECK_TIMEOUT_S" "3 compose nodes seeing each other in swarmnode net" sees_all
detail[compose]="{\"nodes\": 3, \"network_mode\": \"host\"}"
outcome[compose]="passed"
step="done"
