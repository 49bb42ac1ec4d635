#!/usr/bin/env bash
# Accuracy figures for docs/benchmarks.md: calibrate on dev_clean (never on test), then evaluate.
# Writes one JSON per run under bench-results/accuracy/. FULL=1 runs every set in full (about
# two hours on 2 cores); the default runs the headline sets and samples of the others.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data/sentiment
OUT=bench-results/accuracy
mkdir -p "$OUT"
A=.venv/bin/allinone
lim() { if [ -n "${FULL:-}" ]; then echo ""; else echo "--limit $1"; fi; }
run() { local name=$1; shift; echo "== $name" >&2; $A eval --json "$@" > "$OUT/$name.json"; }
if [ "${SKIP_ACCURATE:-}" != 1 ]; then
  $A calibrate --model accurate --task sentiment $D/chnsenticorp/dev_clean.tsv > "$OUT/calibrate-accurate.txt"
  run accurate-test --model accurate --task sentiment $D/chnsenticorp/test.tsv
fi
$A calibrate --model default --task sentiment $D/chnsenticorp/dev_clean.tsv $(lim 400) > "$OUT/calibrate-default.txt"
run default-test --model default --task sentiment $D/chnsenticorp/test.tsv
run fast-classify-test --model fast-classify --task sentiment $D/chnsenticorp/test.tsv
run default-test_clean --model default --task sentiment $D/chnsenticorp/test_clean.tsv
run default-sst2 --model default --task sentiment-en $D/sst2/dev.tsv $(lim 400)
run default-waimai --model default --task sentiment $D/waimai/balanced_4000.tsv $(lim 400)
run default-yelp --model default --task sentiment-en $D/uci/yelp.tsv $(lim 400)
run default-imdb --model default --task sentiment-en $D/uci/imdb.tsv $(lim 400)
if [ -n "${FULL:-}" ]; then
  run accurate-test_clean --model accurate --task sentiment $D/chnsenticorp/test_clean.tsv
fi
echo done >&2
