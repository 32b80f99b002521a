#!/usr/bin/env bash
# The audit step of the memdetect GitHub Action (action.yml next to this file). It reads the action's inputs from
# MEMDETECT_* environment variables, runs `memdetect audit`, and writes the step outputs to $GITHUB_OUTPUT.
# It runs the same way outside GitHub, e.g.:
#   MEMDETECT_PATHS=generated/ MEMDETECT_CONFIG=memdetect.toml bash hooks/github-action/run.sh
# Exit status: memdetect's (0 nothing flagged, 1 flagged or an image not checked, 2 error), except 1 -> 0 when
# MEMDETECT_FAIL_ON_FLAGGED=false and every image was checked (an image that could not be checked always fails).
# With MEMDETECT_ALLOW_EMPTY=true, no paths (or none holding an image) pass with exit 0.
set -uo pipefail

memdetect_bin="${MEMDETECT_BIN:-memdetect}"
output="${MEMDETECT_OUTPUT:-memdetect-report.csv}"
junit="${MEMDETECT_JUNIT-memdetect-junit.xml}"
summary="${MEMDETECT_SUMMARY_JSON:-memdetect-summary.json}"

# paths: one per line (names may contain spaces), or separated by spaces on a single line
paths=()
raw="${MEMDETECT_PATHS:-}"
if [[ "$raw" == *$'\n'* ]]; then
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [ -n "$line" ] && paths+=("$line")
  done <<< "$raw"
else
  read -r -a paths <<< "$raw"
fi
if [ "${#paths[@]}" -eq 0 ]; then
  if [ "${MEMDETECT_ALLOW_EMPTY:-false}" = "true" ]; then
    echo "memdetect action: the 'paths' input is empty: nothing to audit, passing (allow-empty)" >&2
    if [ -n "${GITHUB_OUTPUT:-}" ]; then
      printf '%s\n' "exit-code=0" "images=0" "scored=0" "errored=0" "flagged=0" >> "$GITHUB_OUTPUT"
    fi
    exit 0
  fi
  echo "memdetect action: error: the 'paths' input is empty (set allow-empty: true to pass without images)" >&2
  exit 2
fi

args=(audit "${paths[@]}" --output "$output" --summary-json "$summary"
      --annotations "${MEMDETECT_ANNOTATIONS:-auto}")
[ -n "${MEMDETECT_CONFIG:-}" ] && args+=(--config "$MEMDETECT_CONFIG")
[ -n "${MEMDETECT_CONFIG_SHA256:-}" ] && args+=(--config-sha256 "$MEMDETECT_CONFIG_SHA256")
[ -n "${MEMDETECT_MODEL:-}" ] && args+=(--model "$MEMDETECT_MODEL")
[ -n "${MEMDETECT_MODEL_PATH:-}" ] && args+=(--model-path "$MEMDETECT_MODEL_PATH")
[ -n "${MEMDETECT_THRESHOLD:-}" ] && args+=(--threshold "$MEMDETECT_THRESHOLD")
[ -n "$junit" ] && args+=(--junit "$junit")
[ -n "${MEMDETECT_HTML:-}" ] && args+=(--html "$MEMDETECT_HTML")
[ "${MEMDETECT_ALLOW_EMPTY:-false}" = "true" ] && args+=(--allow-empty)
if [ -n "${MEMDETECT_EXTRA_ARGS:-}" ]; then
  read -r -a extra <<< "$MEMDETECT_EXTRA_ARGS"
  args+=("${extra[@]}")
fi

rm -f -- "$summary"  # never report the counts of an earlier run
"$memdetect_bin" "${args[@]}"
rc=$?

if [ -n "${GITHUB_OUTPUT:-}" ]; then
  {
    echo "exit-code=$rc"
    echo "report=$output"
    echo "junit=$junit"
    echo "summary-json=$summary"
    if [ -f "$summary" ]; then
      python=$(command -v python || command -v python3)
      "$python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
for k in ("images", "scored", "errored", "flagged"):
    print(f"{k}={d[k]}")' "$summary"
    fi
  } >> "$GITHUB_OUTPUT"
fi

if [ "$rc" -eq 1 ] && [ "${MEMDETECT_FAIL_ON_FLAGGED:-true}" = "false" ]; then
  python=$(command -v python || command -v python3)
  unchecked=$("$python" -c 'import json, sys
print(len(json.load(open(sys.argv[1])).get("not_checked", [])))' "$summary" 2>/dev/null || echo unknown)
  if [ "$unchecked" = "0" ]; then
    echo "memdetect action: images were flagged, but fail-on-flagged is false" >&2
    exit 0
  fi
  echo "memdetect action: $unchecked images were not checked; fail-on-flagged=false does not excuse that" >&2
fi
exit "$rc"
