#!/usr/bin/env bash
# Runs CMD as N processes on this host, joined by jax.distributed over loopback (CPU collectives).
#
#   launch/local_multiprocess.sh N CMD [ARGS...]
#   launch/local_multiprocess.sh 2 rwkvunet pretrain --config configs/pretrain_imagenet.py:smoke --workdir runs/mp
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=i, which `rwkvunet pretrain` (--distributed=auto) passes to jax.distributed.initialize.
# JAX_PLATFORMS defaults to cpu; add XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices
# per process. Output lines are prefixed with [pI]. SIGTERM/SIGINT to this script is forwarded to
# every process (a rehearsal of a preemption notice). When a process fails, the others are stopped.
# Exit status: 0 if all succeed, else the first non-zero status in process order (75 = preempted
# after a checkpoint: rerun the same command to resume).
set -uo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD [ARGS...]   (N >= 1 processes)" >&2
  exit 2
fi
n="$1"
shift

port="${LOCAL_MP_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
export JAX_NUM_PROCESSES="$n"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

pids=()
codes=()
forward() {
  local sig="$1"
  echo "local_multiprocess: forwarding SIG${sig} to ${#pids[@]} processes" >&2
  for pid in "${pids[@]}"; do kill -s "$sig" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID="$i" "$@" > >(sed -u "s/^/[p${i}] /") 2> >(sed -u "s/^/[p${i}] /" >&2) &
  pids+=("$!")
  codes+=("")
done

# Poll rather than `wait`, so that forwarded signals and failed peers are handled promptly.
running="$n"
stopped_peers=0
grace="${LOCAL_MP_GRACE:-30}"
while ((running > 0)); do
  sleep 0.2
  # Peers of a failed process may block in a collective; give them a grace period, then kill them.
  if ((stopped_peers > 0 && SECONDS - stopped_peers > grace)); then
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  for ((i = 0; i < n; i++)); do
    [[ -n "${codes[$i]}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"
      codes[$i]=$?
      running=$((running - 1))
      if [[ "${codes[$i]}" != 0 && "${codes[$i]}" != 75 && "$stopped_peers" == 0 ]]; then
        echo "local_multiprocess: process $i exited with ${codes[$i]}; stopping the others" >&2
        stopped_peers=$((SECONDS > 0 ? SECONDS : 1))
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
      fi
    fi
  done
done
wait  # the output filters

for code in "${codes[@]}"; do
  if [[ "$code" != 0 ]]; then exit "$code"; fi
done
exit 0
