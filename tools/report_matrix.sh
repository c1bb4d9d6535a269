#!/usr/bin/env bash
# The experiment matrix behind the report's screenshots (docs/images/report-*.png) and the
# numbers quoted in docs/benchmarks.md ("What the report shows"): real runs of four examples on
# the embedded Redis of a fresh DAGKUBE_HOME, then `dagkube report` and one screenshot per
# section.
#
#   tools/report_matrix.sh [OUT_DIR]      # default OUT_DIR: a new temporary directory
#   REPEAT=2 tools/report_matrix.sh       # fewer runs per (planner, SLA); default 4
#
# About 10 minutes on 2 cores. Nothing outside OUT_DIR is touched, except docs/images when
# SCREENSHOTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d -t dagkube-report.XXXXXX)}
mkdir -p "$out"
export DAGKUBE_HOME="$out/home"
repeat=${REPEAT:-4}
dk=.venv/bin/dagkube

# Every run starts cold (--cold stops the idle workers first): otherwise whichever planner
# runs after another one that used different classes pays cold starts the others do not.
#
# Pre-warm needs cold starts worth hiding: a 2 s start-up, like Pods scheduled onto a node,
# and room for the six parallel parts.
$dk experiment examples/long_then_wide.py --planners wukong,wukong-opt,non-uniform,non-uniform-opt \
    --slas avg,p90 --repeat "$repeat" --startup-delay 2 --max-workers 10 --cold
# Non-uniform's resource savings, and what each SLA buys.
$dk experiment examples/unequal_branches.py --planners wukong,uniform,non-uniform \
    --slas avg,p90,p95,p99 --repeat "$repeat" --cold
# Pre-load: 4 x 16 MB into one fan-in.
$dk experiment examples/large_fanin.py --planners wukong,uniform,uniform-opt --slas avg,p90 \
    --repeat "$repeat" --cold
# Task duplication: each run's build draws whether its fetch hits a 3 s stall (1 in 3).
$dk experiment examples/straggler.py --planners uniform,uniform-opt --slas p50 \
    --repeat $((repeat * 3)) --cold

$dk report -o "$out/report.html"
if [ "${SCREENSHOTS:-0}" = 1 ]; then
    .venv/bin/python tools/report_screenshots.py
fi
echo "report: $out/report.html (history in $DAGKUBE_HOME)"
