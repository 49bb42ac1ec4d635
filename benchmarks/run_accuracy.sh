#!/usr/bin/env bash
# Accuracy figures for the README: calibrate on dev_clean (never test), then evaluate.
# Writes one JSON per run under bench-results/accuracy/. Takes about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data/sentiment
OUT=bench-results/accuracy
mkdir -p "$OUT"
A=.venv/bin/allinone
run() { local name=$1; shift; echo "== $name" >&2; $A eval --json "$@" > "$OUT/$name.json"; }
$A calibrate --model accurate --task sentiment $D/chnsenticorp/dev_clean.tsv > "$OUT/calibrate-accurate.txt"
run accurate-test --model accurate --task sentiment $D/chnsenticorp/test.tsv
$A calibrate --model default --task sentiment $D/chnsenticorp/dev_clean.tsv > "$OUT/calibrate-default.txt"
run default-test --model default --task sentiment $D/chnsenticorp/test.tsv
run default-test_clean --model default --task sentiment $D/chnsenticorp/test_clean.tsv
run default-sst2 --model default --task sentiment-en $D/sst2/dev.tsv
run default-waimai1000 --model default --task sentiment $D/waimai/balanced_4000.tsv --limit 1000
run default-yelp --model default --task sentiment-en $D/uci/yelp.tsv
run default-imdb --model default --task sentiment-en $D/uci/imdb.tsv
run accurate-test_clean --model accurate --task sentiment $D/chnsenticorp/test_clean.tsv
echo done >&2
