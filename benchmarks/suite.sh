#!/bin/bash
# The six-task suite: deep prompt (label init), LoRA and shallow prompt tuning (label init) on
# sst2, trec, agnews, subj, mpqa and mr, the same budget for every method, a learning curve at
# 200 and 600 optimiser steps (at most one epoch) of one run per method and seed, seeds 0 and 1,
# dev 200 rows, the whole test set (AG News: a seeded 1,000-row sample of its 7,600).
# Learning rates come from the earlier sweeps (deep 0.03, LoRA 3e-3: docs/tuning.md); the
# shallow prompt races 0.03 against 0.3 on dev at step 200.
#
#   benchmarks/suite.sh run       # every task in turn; rerun to continue (--resume), finished tasks are skipped
#   benchmarks/suite.sh small     # small training sets (256 and 512 rows, 3 epochs, the budget --kind auto
#                                 # gives them) on SMALL_TASKS (default sst2 trec): compare_small_<task>.*
#   benchmarks/suite.sh length    # the deep prompt with 40 virtual tokens at the suite's budget on LENGTH_TASKS
#                                 # (default trec agnews, the many-way tasks): compare_suite_<task>_n40.*
#   benchmarks/suite.sh levers    # the deep prompt with one lever at the suite's budget, each of LEVERS (default
#                                 # first memory cosine) on LEVER_TASKS (default trec): compare_suite_<task>_<lever>.*
#   benchmarks/suite.sh lr        # the suite's budget at another lr per method (LRS, default "deep-prompt=1e-2 lora=1e-3")
#                                 # on LR_TASKS (default trec): compare_suite_<task>_lr_<method><lr>.*; the README's
#                                 # table takes each method's lr ahead on dev
#   benchmarks/suite.sh epoch     # the deep prompt and LoRA with a third curve point at one epoch (at most 1,500
#                                 # steps; the schedule spans it) on EPOCH_TASKS (default sst2): compare_suite_<task>_epoch.*;
#                                 # EPOCHS=2 makes it two epochs (at most 1,500 steps): compare_suite_<task>_epoch2.*
#   benchmarks/suite.sh epoch-lr  # the same epoch at another lr per method (EPOCH_LRS, default "lora=1e-3"; e.g.
#                                 # "deep-prompt=1e-2 lora=1e-3"): compare_suite_<task>_epoch_<method><lr>.*, e.g. _epoch_deep1e2
#   benchmarks/suite.sh full      # full fine-tuning at the suite's budget (lr 3e-5, the 200-step runs' lr) on
#                                 # FULL_TASKS (default trec sst2): compare_suite_<task>_full.*
#   benchmarks/suite.sh report    # docs/comparison.md and its plots from every result, partial ones included,
#                                 # auto_suite's differences against the cells (auto_suite.py --render)
#                                 # and README.md's suite table (benchmarks/suite_readme.py)
#
# Results: benchmarks/results/compare_suite_<task>.json/.md/.png; while a task runs, its
# finished runs are in compare_suite_<task>.runs.jsonl (the journal --resume reads) and
# compare_suite_<task>.partial.json. Commit both as runs finish: a fresh clone then resumes where the
# last run stopped instead of training the finished runs again (.gitignore keeps journals here).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
TASKS=${TASKS:-"trec sst2 mr subj mpqa agnews"}  # the most informative first
PY=${PYTHON:-python}

run_compare() {  # $1 task, $2 result tag, then compare's flags; skipped when compare_<tag>.json exists, else --resume
  local t=$1 tag=$2 extra=()
  shift 2
  if [ -f "$OUT/compare_$tag.json" ]; then echo "== $tag: done"; return; fi
  [ "$t" = agnews ] && extra=(--test-sample 1000)  # the suite's seeded 1,000-row sample of AG News' 7,600 test rows
  echo "== $tag: start $(date -Is)"
  "$PY" -m softprompt compare --task "$t" "$@" --out "$OUT" --tag "$tag" --resume "${extra[@]}"
}

run() {
  for t in $TASKS; do
    run_compare "$t" "suite_$t" --methods deep-prompt,lora,prompt-tuning --curve 200,600 --epochs 1 --seeds 0,1 \
      --lr-sweep prompt-tuning=0.03/0.3 --lr-sweep deep-prompt=0.03 --lr-sweep lora=3e-3 --init labels
  done
}

small() {
  for t in ${SMALL_TASKS:-sst2 trec}; do
    run_compare "$t" "small_$t" --methods deep-prompt,lora,prompt-tuning --train-sizes 256,512 --epochs 3 --min-steps 50 \
      --seeds 0,1 --lr-sweep deep-prompt=0.03 --lr-sweep lora=3e-3 --lr-sweep prompt-tuning=0.03 --init labels
  done
}

length() {  # prefix length, P-tuning v2's first lever: N=40 led the ablation on TREC's dev (200 steps)
  for t in ${LENGTH_TASKS:-trec agnews}; do
    run_compare "$t" "suite_${t}_n40" --methods deep-prompt --curve 200,600 --epochs 1 --seeds 0,1 \
      --lr-sweep deep-prompt=0.03 --init labels --num-virtual-tokens 40
  done
}

epoch() {  # the learning curve's third point: a whole epoch (at most 1,500 steps) for the deep prompt and LoRA
  local n=${EPOCHS:-1} tag
  for t in ${EPOCH_TASKS:-sst2}; do
    tag="suite_${t}_epoch"; [ "$n" = 1 ] || tag+="$n"
    run_compare "$t" "$tag" --methods deep-prompt,lora --curve 200,600,1500 --epochs "$n" --seeds 0,1 \
      --lr-sweep deep-prompt=0.03 --lr-sweep lora=3e-3 --init labels
  done
}

other_lrs() {  # $1 tag infix (lr, epoch), $2 tasks, $3 "method=lr" items, $4 the variable's name, $5 its methods, then compare's
  # budget flags: each method again at each lr, tag compare_suite_<task>_<infix>_<method><lr>
  # (deep-prompt=1e-2 -> suite_<task>_<infix>_deep1e2); the README takes each method's lr ahead on dev
  local infix=$1 tasks=$2 items=$3 var=$4 methods=$5 m lr
  shift 5
  for t in $tasks; do
    for item in $items; do
      m=${item%%=*}; lr=${item#*=}
      if [[ " $methods " != *" $m "* ]]; then echo "$var: $item: the method is one of: $methods" >&2; exit 2; fi
      run_compare "$t" "suite_${t}_${infix}_${m%%-*}${lr//-/}" --methods "$m" "$@" --seeds 0,1 --lr-sweep "$m=$lr" --init labels
    done
  done
}

lr() {  # the suite's budget at other lrs (LRS, default "deep-prompt=1e-2 lora=1e-3") on LR_TASKS (default trec)
  other_lrs lr "${LR_TASKS:-trec}" "${LRS:-deep-prompt=1e-2 lora=1e-3}" LRS "deep-prompt lora prompt-tuning" --curve 200,600 --epochs 1
}

epoch_lr() {  # the one-epoch point at other lrs (EPOCH_LRS, default lora=1e-3) on EPOCH_TASKS (default sst2)
  other_lrs epoch "${EPOCH_TASKS:-sst2}" "${EPOCH_LRS:-lora=1e-3}" EPOCH_LRS "deep-prompt lora" --curve 200,600,1500 --epochs 1
}

levers() {  # the ablation's arms ahead of the plain deep prompt on TREC's dev at 200 steps, at the suite's budget
  for arm in ${LEVERS:-first memory cosine}; do
    case "$arm" in
      first) flags=(--freeze-first-token) ;;                   # a frozen first virtual token (an attention sink)
      memory) flags=(--prefix-memory) ;;                       # PrefixMemory, its memory at lr 1e-4
      cosine) flags=(--schedule cosine --warmup-ratio 0.1) ;;  # cosine decay after 10% warm-up
      *) echo "LEVERS: unknown arm $arm (first, memory, cosine)" >&2; exit 2 ;;
    esac
    for t in ${LEVER_TASKS:-trec}; do
      run_compare "$t" "suite_${t}_$arm" --methods deep-prompt --curve 200,600 --epochs 1 --seeds 0,1 \
        --lr-sweep deep-prompt=0.03 --init labels "${flags[@]}"
    done
  done
}

full() {  # the stretch target's anchor: full fine-tuning, the same budget, curve and seeds
  for t in ${FULL_TASKS:-trec sst2}; do
    if [ -f "$OUT/compare_suite_${t}_full.json" ]; then echo "== $t, full: done"; continue; fi
    echo "== $t, full: start $(date -Is)"
    "$PY" -m softprompt compare --task "$t" --methods full --curve 200,600 --epochs 1 --seeds 0,1 \
      --lr-sweep full=3e-5 --out "$OUT" --tag "suite_${t}_full" --resume
  done
}

report() {
  files=()
  for t in sst2 trec mr subj mpqa agnews; do  # the finished result, else the runs so far
    for f in "$OUT/compare_suite_$t.json" "$OUT/compare_suite_$t.partial.json"; do
      if [ -f "$f" ]; then files+=("$f"); break; fi
    done
  done
  for f in "$OUT"/compare_suite_*_{n40,first,memory,cosine,epoch,epoch2,seeds}.json "$OUT"/compare_suite_*_epoch_*[0-9].json "$OUT"/compare_suite_*_lr_*[0-9].json "$OUT"/compare_suite_*_full.json; do  # levers and anchors, where run
    if [ -f "$f" ]; then files+=("$f"); fi
  done
  for f in sst2-full sst2-deep-labels trec-full trec-deep-labels trec-deep trec-residual rte sst2-sizes; do
    files+=("$OUT/compare_$f.json")
  done
  list=$(IFS=,; echo "${files[*]}")
  "$PY" -m softprompt compare --out docs --notes docs/comparison-notes.md --report "$list"
  if [ -f "$OUT/auto_suite.json" ]; then "$PY" benchmarks/auto_suite.py --render; fi  # its differences against today's cells
  if [ -f "$OUT/auto_suite_fp32.json" ]; then "$PY" benchmarks/auto_suite.py --render --precision fp32; fi
  "$PY" benchmarks/suite_readme.py --readme README.md --results "$OUT"  # the suite table between its markers
}

case "${1:-}" in
  run) run ;;
  small) small ;;
  length) length ;;
  levers) levers ;;
  epoch) epoch ;;
  epoch-lr) epoch_lr ;;
  lr) lr ;;
  full) full ;;
  report) report ;;
  *) echo "usage: benchmarks/suite.sh run|small|length|levers|lr|epoch|epoch-lr|full|report" >&2; exit 2 ;;
esac
