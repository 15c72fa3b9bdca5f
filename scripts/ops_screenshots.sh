#!/usr/bin/env bash
# Screenshots of the ops view (docs/ops-view/): a demo run (T=1) against a Prefect server on 127.0.0.1:4311, then
# headless Chromium on the flow run, the artifacts, the runs filtered by tag and the HTML report.
#   bash scripts/ops_screenshots.sh [OUT]        (OUT: $S by default; needs chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:-$S}
mkdir -p "$S"
export PREFECT_HOME=$S/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
rm -rf "$S/prefect-home" "$S/runs"
PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=4311 .venv/bin/prefect server start > $S/server.log 2>&1 &
SERVER=$!
trap "kill $SERVER" EXIT
for i in $(seq 60); do curl -sf http://127.0.0.1:4311/api/health >/dev/null && break; sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:4311/api
  .venv/bin/tokenclean demo --workdir $S/runs --set iterations=1 > $S/demo.log 2>&1
.venv/bin/tokenclean report $S/runs/demo --out $S/report.html > /dev/null 2>&1 || .venv/bin/tokenclean report $S/runs/demo > $S/report.log 2>&1
IDS=$S/ids.json .venv/bin/python - <<'PY'
import asyncio, json, os
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs()
        arts = await c.read_artifacts()
        latest = {}
        for a in sorted(arts, key=lambda a: a.created):
            if a.key:
                latest[a.key] = str(a.id)
        out = {"runs": [(str(r.id), r.name) for r in runs], "artifacts": latest}
        print(json.dumps(out))
        open(os.environ["IDS"], "w").write(json.dumps(out))
asyncio.run(main())
PY
RUN=$(.venv/bin/python -c "import json; d=json.load(open('$S/ids.json')); print([i for i,n in d['runs'] if 'fixed-model' in n][0])")
shot() { ${CHROMIUM:-chromium} --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir=$S/profile \
  --virtual-time-budget=20000 --window-size=$3 --screenshot=$2 "$1" 2>/dev/null; }
shot "http://127.0.0.1:4311/runs/flow-run/$RUN" $S/flow-run.png 1600,1100
shot "http://127.0.0.1:4311/runs/flow-run/$RUN?tab=Logs" $S/flow-run-logs.png 1600,1100
art() { .venv/bin/python -c "import json; print(json.load(open('$S/ids.json'))['artifacts']['$1'])"; }
shot "http://127.0.0.1:4311/artifacts/artifact/$(art demo-token-cleaning-comparison)" $S/comparison-artifact.png 1600,1100
shot "http://127.0.0.1:4311/artifacts/artifact/$(art demo-token-cleaning-summary)" $S/summary-artifact.png 1600,1100
shot "http://127.0.0.1:4311/runs?tags=run:demo" $S/runs-by-tag.png 1600,900
shot "http://127.0.0.1:4311/artifacts/artifact/$(art demo-token-cleaning-metrics)" $S/metrics-artifact.png 1600,1100
shot "http://127.0.0.1:4311/artifacts/artifact/$(art demo-score-base)" $S/progress-artifact.png 1600,900
REPORT=$(ls -t $S/runs/demo/*.html 2>/dev/null | head -1); REPORT=${REPORT:-$S/report.html}
shot "file://$REPORT" $S/report.png 1200,2400
ls -la $S/*.png
