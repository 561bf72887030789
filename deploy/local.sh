#!/usr/bin/env bash
# A local Prefect stack for kdflow: server (SQLite), `cpu` + `gpu` process pools, the deployments of
# prefect.yaml, one worker per pool. `make up` / `make down` call this; see docs/prefect.md.
#
#   deploy/local.sh up       start everything (idempotent: a part already running is left alone)
#   deploy/local.sh down     stop the workers, then the server (SIGTERM, a second SIGTERM, then SIGKILL)
#   deploy/local.sh status   what is running
#
# Settings (environment):
#   KDFLOW_PREFECT_PORT                  server port (4200)
#   KDFLOW_UP_DIR                        pids, logs, env file (.kdflow/up)
#   PREFECT_HOME                         server database + worker state (.kdflow/prefect)
#   PREFECT_RESULTS_LOCAL_STORAGE_PATH   where task/flow results persist (.kdflow/results); every
#                                        process that reads a result (parent flow, workers) needs the same
#   PREFECT_SERVER_DATABASE_CONNECTION_URL  PostgreSQL instead of SQLite (postgresql+asyncpg://...)
#   KDFLOW_GPU_SLOTS                     global concurrency limit taken by training (gpu-0), 1 slot
#   KDFLOW_ALERT_WEBHOOK_URL             Slack/Teams incoming webhook: a failed or crashed nightly-smoke
#                                        run posts there (flows/alerts.py); unset: existing block or no alerts
#   KDFLOW_UP_WORKERS                    1 (default): start the workers; 0: server and deployments only
#   KDFLOW_UP_WAIT_S                     seconds to wait for the scheduler's first nightly run (60)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${KDFLOW_BIN:-$ROOT/.venv/bin}"
PORT="${KDFLOW_PREFECT_PORT:-4200}"
UP="${KDFLOW_UP_DIR:-$ROOT/.kdflow/up}"
SLOTS="${KDFLOW_GPU_SLOTS:-gpu-0}"

export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.kdflow/prefect}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_RESULTS_LOCAL_STORAGE_PATH="${PREFECT_RESULTS_LOCAL_STORAGE_PATH:-$ROOT/.kdflow/results}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore

alive() { [[ -f "$UP/$1.pid" ]] && kill -0 "$(cat "$UP/$1.pid")" 2>/dev/null; }

# Start "$@" detached in its own process group (so `down` can stop it with its children), pid in $UP/$name.pid.
spawn() {
  local name=$1; shift
  if alive "$name"; then echo "  $name already running (pid $(cat "$UP/$name.pid"))"; return; fi
  if command -v setsid >/dev/null; then
    setsid "$@" >"$UP/$name.log" 2>&1 < /dev/null &
  else
    nohup "$@" >"$UP/$name.log" 2>&1 < /dev/null &
  fi
  echo $! >"$UP/$name.pid"
  echo "  $name started (pid $!, log $UP/$name.log)"
}

wait_healthy() {
  for _ in $(seq 1 360); do
    if command -v curl >/dev/null; then
      [[ "$(curl -s --max-time 2 "$PREFECT_API_URL/health" 2>/dev/null)" == true ]] && return 0
    elif "$BIN/python" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2).read().strip()==b'true' else 1)" 2>/dev/null; then
      return 0
    fi
    alive server || { echo "server exited; see $UP/server.log" >&2; tail -20 "$UP/server.log" >&2; return 1; }
    sleep 0.5
  done
  echo "server not healthy after 180 s; see $UP/server.log" >&2
  return 1
}

# SIGTERM, wait; an idle `prefect worker start` ignores the first SIGTERM, so send a second; then SIGKILL.
stop() {
  local name=$1 pid
  [[ -f "$UP/$name.pid" ]] || return 0
  pid=$(cat "$UP/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    for step in TERM:6 TERM:30 KILL:10; do  # signal:half-seconds to wait for it
      kill -s "${step%:*}" -- "-$pid" 2>/dev/null || kill -s "${step%:*}" "$pid" 2>/dev/null || true
      for _ in $(seq 1 "${step#*:}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null || break
    done
    echo "  $name stopped (pid $pid)"
  fi
  rm -f "$UP/$name.pid"
}

up() {
  mkdir -p "$UP" "$PREFECT_HOME" "$PREFECT_RESULTS_LOCAL_STORAGE_PATH"
  cd "$ROOT"
  echo "server: $PREFECT_API_URL (database: ${PREFECT_SERVER_DATABASE_CONNECTION_URL:-SQLite in $PREFECT_HOME})"
  spawn server "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" --analytics-off
  wait_healthy
  echo "pools, concurrency, deployments:"
  # `cpu` and `gpu` process pools, gpu concurrency limit 1, global concurrency limit $SLOTS (1 slot)
  "$BIN/python" -m flows.up pools --slots "$SLOTS"
  "$BIN/prefect" --no-prompt deploy --all >"$UP/deploy.log" 2>&1 || { cat "$UP/deploy.log" >&2; exit 1; }
  grep -o "Deployment '[^']*'" "$UP/deploy.log" | sed 's/^/  /'
  # the nightly's alert automation (flows/alerts.py), then the health check (flows/health.py): fails loudly
  # (exit 1, the traceback on stderr) if the server logged a traceback or never scheduled the nightly
  "$BIN/python" -m flows.up check --server-log "$UP/server.log" --wait "${KDFLOW_UP_WAIT_S:-60}"
  if [[ "${KDFLOW_UP_WORKERS:-1}" != 0 ]]; then
    echo "workers:"
    spawn worker-cpu "$BIN/prefect" worker start --pool cpu --type process --install-policy never --name kdflow-cpu
    spawn worker-gpu "$BIN/prefect" worker start --pool gpu --type process --install-policy never --name kdflow-gpu --limit 1
  fi
  cat >"$UP/env" <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
export PREFECT_RESULTS_LOCAL_STORAGE_PATH=$PREFECT_RESULTS_LOCAL_STORAGE_PATH
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
EOF
  echo
  echo "UI: http://127.0.0.1:$PORT   (Deployments > distill/<preset> or distill/manual > Run > Custom run)"
  echo "CLI runs against this server:  source $UP/env"
  echo "  kdflow run configs/smoke.yaml --set orchestration.train_deployment=kd-train/gpu"
  echo "  prefect deployment run distill/nightly-smoke"
  echo "stop: make down"
}

down() {
  stop worker-cpu
  stop worker-gpu
  stop server
  rm -f "$UP/env"
}

status() {
  for name in server worker-cpu worker-gpu; do
    if alive "$name"; then echo "$name: running (pid $(cat "$UP/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
