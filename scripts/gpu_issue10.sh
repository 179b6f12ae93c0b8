#!/usr/bin/env bash
# Issue 10 on the lent GPU machine, inside ../shared/gpu/serve.sh (BASE_URL and MODEL are exported there).
# One call runs the phases named as arguments, in order; results go to .gpu/work (carried between calls)
# and come back as one tarball under $OUT (the device returns at most 8 files).
#   sweep-low   sweep levels 4,6,8,12,32,64 (the tutorial's levels and beyond), streamed
#   sweep-high  the same report directory, levels 96,128 (the baseline's peak)
#   fixed6      run --concurrency 6 (the tutorial's recommendation) on the 600 fixed rows, 200 s deadline
#   auto        run --concurrency auto on the same 600 rows
#   fixed96     run --concurrency 96 on the same rows, for a side-by-side with auto
#   auto-long   run --concurrency auto on 1,200 rows (the 600 twice), long enough to see it settle
#   agree       levels 4 and 64 (the two that differed from the baseline's table by more than 15%), measured by
#               the baseline client and by our sweep on the same server, one after the other, with the baseline's
#               load: plain (not streamed), max(16, 2x the level) requests, no warm-up
set -u
W=.gpu/work
mkdir -p "$W"
PY=${PY:-python3}
COMMON=(--base-url "$BASE_URL" --model "$MODEL" --max-tokens 150 --temperature 0.7 --top-p 0.9 --stream
        --progress plain)
PLAIN=(--base-url "$BASE_URL" --model "$MODEL" --max-tokens 150 --temperature 0.7 --top-p 0.9 --no-stream
       --progress plain)
phase() { echo "=== phase $1 at $(date +%T)"; }
for p in "$@"; do
  case "$p" in
    sweep-low)  phase "$p"; $PY -m gptoss_batch sweep sample_prompts/tutorial.jsonl --levels 4,6,8,12,32,64 \
                  --report-dir "$W/sweep" "${COMMON[@]}" ;;
    sweep-high) phase "$p"; $PY -m gptoss_batch sweep sample_prompts/tutorial.jsonl --levels 96,128 \
                  --report-dir "$W/sweep" "${COMMON[@]}" ;;
    fixed6)     phase "$p"; $PY -m gptoss_batch run sample_prompts/tutorial_600.jsonl -o "$W/fixed6.jsonl" \
                  --concurrency 6 --deadline 200 "${COMMON[@]}" ;;
    auto)       phase "$p"; $PY -m gptoss_batch run sample_prompts/tutorial_600.jsonl -o "$W/auto.jsonl" \
                  --concurrency auto --log-controller "$W/auto_controller.jsonl" "${COMMON[@]}" ;;
    fixed96)    phase "$p"; $PY -m gptoss_batch run sample_prompts/tutorial_600.jsonl -o "$W/fixed96.jsonl" \
                  --concurrency 96 "${COMMON[@]}" ;;
    auto-long)  phase "$p"; $PY -c 'import sys; rows = open("sample_prompts/tutorial_600.jsonl").read().splitlines()
sys.stdout.write("".join(r.replace("\"id\": \"r", "\"id\": \"b" if i >= 600 else "\"id\": \"r") + "\n"
                         for i, r in enumerate(rows + rows)))' > "$W/rows1200.jsonl"
                $PY -m gptoss_batch run "$W/rows1200.jsonl" -o "$W/auto_long.jsonl" --concurrency auto \
                  --log-controller "$W/auto_long_controller.jsonl" "${COMMON[@]}" ;;
    agree)      phase "$p"; mkdir -p "$W/agree"
                for L in 4 64; do
                  N=$(( 2 * L > 16 ? 2 * L : 16 ))
                  $PY .gpu/baseline_client.py sweep --base-url "${BASE_URL%/v1}" --model "$MODEL" --max-tokens 150 \
                    --levels "$L" --min-requests 16 --multiplier 2 --json-out "$W/agree/baseline_$L.json" \
                    --txt-out "$W/agree/baseline_$L.txt" 2>&1 | grep -v '^LEVEL '
                  $PY -m gptoss_batch sweep sample_prompts/tutorial.jsonl --levels "$L" --requests-per-level "$N" \
                    --warmup 0 --report-dir "$W/agree/ours_$L" "${PLAIN[@]}"
                  tar czf "$OUT/work.tgz" -C .gpu work
                done ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
  echo "=== phase $p rc=$? at $(date +%T)"
  tar czf "$OUT/work.tgz" -C .gpu work  # after every phase, so a timeout still brings back what was done
done
