#!/usr/bin/env bash
# Container entrypoint: turn SWARMNODE_* environment variables into `swarmnode run` flags.
#
#   docker run ... swarmnode                 -> swarmnode run <flags from env>
#   docker run ... swarmnode --rounds 5      -> swarmnode run <flags from env> --rounds 5
#   docker run ... swarmnode key show        -> swarmnode key show   (any subcommand, as given)
#   docker run ... swarmnode healthcheck     -> swarmnode status --json --node <admin address>
#   docker run ... swarmnode bash            -> bash                 (anything else is executed)
#
# Variables (all optional):
#   SWARMNODE_CONFIG          TOML config file                       --config
#   SWARMNODE_DATA_DIR        key, checkpoints, logs (default /data) --data-dir
#   SWARMNODE_BOOTSTRAP       bootstrap multiaddrs, comma/space separated   --bootstrap (each)
#   SWARMNODE_BOOTSTRAP_FILE  file holding bootstrap multiaddrs (a local swarm's bootstrap writes
#                             it); waits up to SWARMNODE_BOOTSTRAP_WAIT seconds (default 60)
#   SWARMNODE_LISTEN          p2p listen multiaddrs (default /ip4/0.0.0.0/tcp/4001)  --listen
#   SWARMNODE_ANNOUNCE        multiaddrs peers should dial (behind NAT: your public address);
#                             'auto' = this container's IP and listen port    --set p2p.announce=[...]
#   SWARMNODE_ANNOUNCE_ADDR_FILE  write this node's dialable multiaddr + peer id to this file
#                             before starting (used by the local swarm's bootstrap): the first
#                             announce address, else the listen address unless it is 0.0.0.0,
#                             else the container's IP and listen port
#   SWARMNODE_ROUNDS          rounds to run                          --rounds
#   SWARMNODE_DEVICE          auto|cpu|cuda|mps                      --device
#   SWARMNODE_BACKEND         auto|transformers|vllm                 --backend
#   SWARMNODE_SILO            1 = train alone                        --silo
#   SWARMNODE_MODEL           model path / hub id / embedded:<name>  --set model.path=...
#   SWARMNODE_NAME            node name                              --set name=...
#   SWARMNODE_ADMIN_ADDR      admin gRPC address (default 127.0.0.1:7070, used by the healthcheck)
#   SWARMNODE_METRICS_ADDR    Prometheus address (default 0.0.0.0:9100)
#   SWARMNODE_METRICS_PUBLIC  true: /metrics off loopback without a token (the node warns);
#                             default: true only for the image's own 0.0.0.0:9100 (reached through
#                             `docker run -p`); otherwise Prometheus sends SWARMNODE__ADMIN__TOKEN
#   SWARMNODE_DRY_RUN         1 = print the final command (one argument per line) and exit
# Any SWARMNODE__SECTION__KEY=value variable is read by swarmnode itself (config override).
set -euo pipefail

data_dir="${SWARMNODE_DATA_DIR:-/data}"
admin_addr="${SWARMNODE_ADMIN_ADDR:-127.0.0.1:7070}"
metrics_addr="${SWARMNODE_METRICS_ADDR:-0.0.0.0:9100}"

say() { echo "swarmnode-entrypoint: $*" >&2; }

launch() {
    if [[ "${SWARMNODE_DRY_RUN:-0}" == "1" ]]; then
        printf '%s\n' "$@"
        exit 0
    fi
    exec "$@"
}

split_words() {  # comma- or space-separated list -> one item per line
    local item
    for item in ${1//,/ }; do  # word splitting on purpose: the list is comma/space separated
        printf '%s\n' "$item"
    done
}

bootstrap_from_file() {
    local file="$1" wait_s="${SWARMNODE_BOOTSTRAP_WAIT:-60}" waited=0
    while [[ ! -s "$file" ]]; do
        if (( waited >= wait_s )); then
            say "no bootstrap address in $file after ${wait_s}s; starting without it (silo until peers appear)"
            return 0
        fi
        sleep 1
        waited=$((waited + 1))
    done
    cat "$file"
}

listen_port() {  # TCP port of the first listen multiaddr
    split_words "${SWARMNODE_LISTEN:-/ip4/0.0.0.0/tcp/4001}" | head -n1 | awk -F/ '{print $5}'
}

write_own_addr() {  # file, then the address peers dial (empty: container IP + listen port)
    local file="$1" base="${2:-}" key_path="$data_dir/identity.key" port
    port="$(listen_port)"
    mkdir -p "$(dirname "$file")" "$data_dir"
    python - "$key_path" "$port" "$file" "$base" <<'PY'
import os, socket, sys
from swarmnode.identity import Identity

key_path, port, out, base = sys.argv[1:5]
peer_id = Identity.load_or_create(key_path).peer_id
if not base:
    base = f"/ip4/{socket.gethostbyname(socket.gethostname())}/tcp/{port}"
tmp = f"{out}.{os.getpid()}"
with open(tmp, "w") as f:
    f.write(f"{base}/p2p/{peer_id}\n")
os.replace(tmp, out)  # readers never see a partial address
PY
    say "wrote my address to $file: $(cat "$file")"
}

case "${1:-}" in
    healthcheck)
        launch swarmnode status --json --node "$admin_addr"
        ;;
    "" | -*)
        ;;  # options for `swarmnode run`: handled below
    run)
        shift
        ;;
    key | status | peers | net | simulate | report)
        launch swarmnode "$@"
        ;;
    *)
        launch "$@"
        ;;
esac

cmd=(swarmnode run --data-dir "$data_dir"
     --set "admin.listen=$admin_addr" --set "admin.metrics_listen=$metrics_addr")
# The image's own 0.0.0.0 default is reachable only through `docker run -p`'s mapping: serve it
# without a token (the node warns). An address the user chose gets the node's rule: off loopback,
# the admin token, unless SWARMNODE_METRICS_PUBLIC=true.
metrics_public="${SWARMNODE_METRICS_PUBLIC:-}"
[[ -z "$metrics_public" && -z "${SWARMNODE_METRICS_ADDR:-}" ]] && metrics_public=true
[[ -n "$metrics_public" ]] && cmd+=(--set "admin.metrics_public=$metrics_public")
[[ -n "${SWARMNODE_CONFIG:-}" ]] && cmd+=(--config "$SWARMNODE_CONFIG")
while read -r addr; do
    cmd+=(--listen "$addr")
done < <(split_words "${SWARMNODE_LISTEN:-/ip4/0.0.0.0/tcp/4001}")

bootstraps="${SWARMNODE_BOOTSTRAP:-}"
if [[ -n "${SWARMNODE_BOOTSTRAP_FILE:-}" ]]; then
    bootstraps="$bootstraps $(bootstrap_from_file "$SWARMNODE_BOOTSTRAP_FILE")"
fi
while read -r addr; do
    cmd+=(--bootstrap "$addr")
done < <(split_words "$bootstraps")

announce="${SWARMNODE_ANNOUNCE:-}"
if [[ "$announce" == "auto" ]]; then
    announce="/ip4/$(hostname -i | awk '{print $1}')/tcp/$(listen_port)"
fi
if [[ -n "$announce" ]]; then
    json=""
    while read -r addr; do
        json="${json:+$json,}\"$addr\""
    done < <(split_words "$announce")
    cmd+=(--set "p2p.announce=[$json]")
fi

[[ -n "${SWARMNODE_ROUNDS:-}" ]] && cmd+=(--rounds "$SWARMNODE_ROUNDS")
[[ -n "${SWARMNODE_DEVICE:-}" ]] && cmd+=(--device "$SWARMNODE_DEVICE")
[[ -n "${SWARMNODE_BACKEND:-}" ]] && cmd+=(--backend "$SWARMNODE_BACKEND")
[[ "${SWARMNODE_SILO:-0}" == "1" ]] && cmd+=(--silo)
[[ -n "${SWARMNODE_MODEL:-}" ]] && cmd+=(--set "model.path=$SWARMNODE_MODEL")
[[ -n "${SWARMNODE_NAME:-}" ]] && cmd+=(--set "name=$SWARMNODE_NAME")

if [[ -n "${SWARMNODE_ANNOUNCE_ADDR_FILE:-}" && "${SWARMNODE_DRY_RUN:-0}" != "1" ]]; then
    # The address peers dial: the first announce address, else a specific listen address (the
    # loopback one on the host network), else the container's IP (write_own_addr's default).
    own_addr="$(split_words "$announce" | head -n1)"
    if [[ -z "$own_addr" ]]; then
        own_addr="$(split_words "${SWARMNODE_LISTEN:-/ip4/0.0.0.0/tcp/4001}" | head -n1)"
        [[ "$own_addr" == /ip4/0.0.0.0/* ]] && own_addr=""
    fi
    write_own_addr "$SWARMNODE_ANNOUNCE_ADDR_FILE" "$own_addr"
fi

launch "${cmd[@]}" "$@"
