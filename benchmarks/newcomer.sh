#!/bin/bash
# A newcomer's first minutes, from the README, on a fresh clone: the main job, then the comparison that puts `full`
# and the no-learning floor beside it, the figure, a recommendation and the side-by-side images. Every command is
# what the README and docs/comparing.md print; each is timed as the user waits for it.
#
#   bash benchmarks/newcomer.sh OUT_DIR        # from the root of a fresh clone, lwbench installed, empty cache
#
# Run it alone on the machine (the timings are a user's wall clock). Writes OUT_DIR/transcript.txt and the figures.
set -euo pipefail
out=${1:?give an output folder}
mkdir -p "$out"
export LWBENCH_CACHE=${LWBENCH_CACHE:-$(mktemp -d)}
log="$out/transcript.txt"
: > "$log"
step() {
  echo "\$ $*" | tee -a "$log"
  local t0=$(date +%s)
  "$@" 2>&1 | tee -a "$log"
  echo "[wall $(( $(date +%s) - t0 )) s]" | tee -a "$log"
  echo | tee -a "$log"
}
echo "# $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, cache $LWBENCH_CACHE" | tee -a "$log"
step lwbench run --method lookwhere --task traffic_signs
step lwbench compare --task traffic_signs --methods lookwhere,saliency --dry-run
step lwbench compare --task traffic_signs --methods lookwhere,saliency --out "$out/compare_traffic_signs_gmacs.png"
step lwbench recommend --task traffic_signs --min-accuracy 90
step lwbench recommend --task traffic_signs --max-gmacs 0.035
step lwbench show --compare lookwhere,saliency --task traffic_signs --disagree --out "$out/show_compare.png"
