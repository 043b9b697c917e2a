#!/usr/bin/env bash
# Durable audit vs audit without fsync, same daemon build, alternating runs
# (issue 6 target: durable within 15 %). Usage: bash bench/audit_cost.sh
set -u
cd "$(dirname "$0")/.."
one() {  # $1 = extra flag
  rm -rf /tmp/ac; mkdir -p /tmp/ac; chmod 755 /tmp/ac
  .venv/bin/badged dev --state-dir /tmp/ac/s $1 > /tmp/ac/out 2>/tmp/ac/err &
  pid=$!
  for i in $(seq 100); do grep -q ready /tmp/ac/out 2>/dev/null && break; sleep 0.1; done
  bash bench/run --only badged --clients 16 --duration 3 --pair-rounds 0 --rss-requests 0 --no-plot \
     --badged-socket /tmp/ac/s/run/agent.sock --badged-pid $pid --json /tmp/ac-$2.json > /tmp/ac-$2.txt 2>/dev/null
  kill -TERM $pid; wait $pid
  python3 -c "
import json; d=json.load(open('/tmp/ac-$2.json'))
for r in d['rows']:
    if r['clients']==16 and 'via' not in r['label']: print('$2', r['label'], r['ops_per_s'])"
}
for round in 1 2; do one "--unsafe-audit-no-fsync" nofsync$round; one "" durable$round; done
