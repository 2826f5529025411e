#!/bin/bash
# One lever on top of the demo's recipe: train configs/demo.yaml with some `imlnet fit`
# overrides (no validation during training; the last model is exported), then evaluate it on a
# benchmark's test views with satellite descriptors of one pass and pooled over the four turns
# (bench/turns_eval.py). Writes runs/levers/NAME/{fit.log,result.txt}.
#
#   bash bench/recipe_lever.sh flips --model.cache_flips true
#   DATA=runs/data1200 TEST=runs/demo/data bash bench/recipe_lever.sh p1200 --data.sample_num 2
#
# DATA: the training benchmark (default runs/demo/data); TEST: the benchmark whose test views
# are evaluated (default DATA). The results of docs/benchmarks.md ("Levers") came from it.
set -euo pipefail
name=$1
shift
out=runs/levers/$name
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
start=$(date +%s)
"$py" -m imlnet fit --config configs/demo.yaml --data.root "${DATA:-runs/demo/data}" \
  --trainer.default_root_dir "$out" --trainer.logger false \
  --trainer.check_val_every_n_epoch 100 --model.export_dir "$out/export" "$@" >"$out/fit.log" 2>&1
end=$(date +%s)
echo "fit_s $((end - start)) load $(cut -d' ' -f1 /proc/loadavg)" >"$out/result.txt"
"$py" bench/turns_eval.py "$out/export" "${TEST:-${DATA:-runs/demo/data}}" >>"$out/result.txt"
cat "$out/result.txt"
