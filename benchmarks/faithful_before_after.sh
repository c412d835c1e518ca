#!/usr/bin/env bash
# Issue 16's before/after rows: DPS and IPS on quick synthetic billiards (finetuned regime, seed 0, the shipped
# teacher b1e86a930dd2), run by the code before the faithfulness change (commit f180ea4^, method version 1) and by
# the current code (version 2), each into its own results folder, then both tables.
#   bash benchmarks/faithful_before_after.sh [OUT]     (about 25 min on 2 cores)
# "Before" runs the old tree unpacked to a temporary folder, with the editable install of this checkout hidden,
# so both versions share the cache (teacher) but never a run id (the method version is in it).
set -euo pipefail
OUT=${1:-/tmp/faithful_before_after}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OLD=$OUT/v1pkg
mkdir -p "$OUT"
if [ ! -d "$OLD/lwbench" ]; then
  src=$(mktemp -d)
  git -C "$REPO" archive f180ea4^ | tar -x -C "$src"
  mkdir -p "$OLD"
  cp -r "$src/lwbench" "$OLD/"
  for d in methods tasks configs; do cp -r "$src/$d" "$OLD/lwbench/$d"; done
  rm -rf "$src"
fi
cat > "$OUT/old_lwbench.py" <<PY
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, "$OLD")
import lwbench
assert lwbench.__file__.startswith("$OLD"), lwbench.__file__
from lwbench.cli import main
sys.exit(main(sys.argv[1:]))
PY
for budget in k=48 k=96; do
  for method in dps ips; do
    LWBENCH_RESULTS=$OUT/v2 lwbench run --method $method --task billiards --budget $budget --regime finetuned
    LWBENCH_RESULTS=$OUT/v1 python "$OUT/old_lwbench.py" run --method $method --task billiards --budget $budget \
      --regime finetuned
  done
done
LWBENCH_RESULTS=$OUT/v2 lwbench run --method full --task billiards --regime finetuned
for v in v1 v2; do echo "== $v"; LWBENCH_RESULTS=$OUT/$v lwbench results --task billiards; done
