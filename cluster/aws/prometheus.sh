#!/usr/bin/env bash
# Prometheus on the Ray head, listening on 127.0.0.1:9090 only (reach it with 'ray attach -p 9090'
# or ssh -L 9090:127.0.0.1:9090). It reads cluster/prometheus/prometheus.yml as it is: alexray's
# file_sd targets that the job drivers write in /tmp/alexray/prometheus-targets, and Ray's own
# /tmp/ray/prom_metrics_service_discovery.json. Run by head_start_ray_commands.
#   prometheus.sh start|stop|restart|status
set -euo pipefail
config="$HOME/alexray/cluster/prometheus/prometheus.yml"
data="$HOME/prometheus-data"
pidfile="$HOME/prometheus.pid"
log="$HOME/prometheus.log"

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

start() {
  if running; then echo "prometheus already running (pid $(cat "$pidfile"))"; return; fi
  # A broken configuration fails here, with promtool's message, not later in the log.
  promtool check config "$config"
  mkdir -p "$data"
  # Whoever can write the targets directory chooses what Prometheus scrapes: this user's, 0700.
  install -d -m 0700 /tmp/alexray /tmp/alexray/prometheus-targets
  if [[ $(stat -c %u /tmp/alexray/prometheus-targets) != "$(id -u)" ]]; then
    echo "prometheus.sh: /tmp/alexray/prometheus-targets belongs to another user; remove it" >&2; exit 2
  fi
  nohup prometheus --config.file="$config" --storage.tsdb.path="$data" \
    --storage.tsdb.retention.time=15d --web.listen-address=127.0.0.1:9090 >>"$log" 2>&1 &
  echo $! >"$pidfile"
  echo "prometheus started (pid $!), http://127.0.0.1:9090 on the head, log $log"
}

stop() {
  if running; then kill "$(cat "$pidfile")" && rm -f "$pidfile" && echo "prometheus stopped"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; sleep 1; start ;;
  status) if running; then echo "running (pid $(cat "$pidfile"))"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
