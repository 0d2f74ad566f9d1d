#!/usr/bin/env bash
# The whole recipe for one seed, then the two tables:
#   data -> AR teacher (+ no-trace and no-rejection ablations) -> naive conversion -> CFT (+ no-validity ablation)
#   -> OPD -> RL -> t* on validation -> test evaluation at t* -> bench -> OPD's controls -> frontier
#   -> ablations (+ RL-tuned AR, + a KL penalty, ...) -> report
#
#   bash run.sh                  # picks the setting from the machine: gpu where CUDA is available, else cpu
#   bash run.sh cpu              # a 2-core CPU: a small model, results/cpu/
#   bash run.sh gpu core         # only the chain (data ... rl, bench); `ablations` runs the controls after it
#   bash run.sh cpu chain        # the stages and the main table's rows at t* only (no bench, controls, frontier)
#   bash run.sh cpu seeds        # the chain for seeds 1, 2 into <results>/seeds/<seed>/ (and 0, unless the whole
#                                # run was seed 0: its evaluations are copied to seeds/0), then the tables with the
#                                # mean and spread over seeds (out/ keeps the last seed's models)
# Environment: DATA_DIR (default data/beauty), DATA_NAME (default Beauty: the S3-Rec files <name>.txt and
# <name>_item2attributes.json; later stages read it from the teacher's record), SEED (default 0), BLOCK
# (default 16), RESULTS_DIR, BUDGET (seconds; a control starts only if it would end within it).
# Writes run.json beside the results: the commit, the setting, and each stage's command, wall time and exit.
set -euo pipefail
cd "$(dirname "$0")"
if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then FOUND=gpu; else FOUND=cpu; fi
MODE=${1:-$FOUND}
PART=${2:-all}
case "$MODE" in
  cpu|gpu) ;;
  *) echo "error: unknown setting '$MODE' (cpu or gpu; with none, the machine decides)"; exit 2 ;;
esac
if [ -z "${1:-}" ]; then echo "setting: $MODE (CUDA $( [ $FOUND = gpu ] && echo found || echo not found ); 'bash run.sh cpu|gpu' forces one)"; fi
SEED=${SEED:-0}
BLOCK=${BLOCK:-16}  # tokens per block; at 16 the answer opens a block of its own (reasoning.encode)
D="--data_dir=${DATA_DIR:-data/beauty} --seed=$SEED"
NAME="--data_name=${DATA_NAME:-Beauty}"   # the AR stages read it; every later one takes it from its parent
if [ "$MODE" = cpu ]; then
  export RESULTS_DIR=${RESULTS_DIR:-results/cpu}  # never mixed with the GPU numbers in results/
  BUDGET=${BUDGET:-4500}                           # the whole recipe within 75 minutes
  DEV="--device=cpu"    # each stage then fills in its CPU_SETTING (a small model, short runs: common.parse_config)
  AR=""; DIR=""; CFT=""; OPD=""; RL=""
  WARM=50
  L2R="--l2r_states=4"                  # the off-policy control's KL at 4 offsets a block (train_opd.py)
  MORE="--max_steps=1000 --eval_every=100"  # stopped at OPD's wall time (core)
  BENCH=""                              # bench.py picks CPU-sized work by itself
  EVAL="--batch_size=64"                # every row on the whole test set
  EVAL_AR="--batch_size=300"
else
  export RESULTS_DIR=${RESULTS_DIR:-results}
  BUDGET=${BUDGET:-100000}
  DEV=""
  AR="--time_limit=80"; DIR="--time_limit=30"
  CFT="--time_limit=60"; WARM=200; L2R=""; OPD="--time_limit=30"; MORE="--max_steps=3000"; RL="--time_limit=30"
  BENCH="--repeats=3"
  EVAL="--batch_size=512"
  EVAL_AR="$EVAL"
fi
mkdir -p "$RESULTS_DIR"
if [ "$PART" = seeds ]; then
  for s in 0 1 2; do
    rm -rf "$RESULTS_DIR/seeds/$s"  # no file of an older run of this seed is read with the new ones
    if [ $s = 0 ] && python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["seed"] != 0)' \
         "$RESULTS_DIR/run.json" 2>/dev/null; then  # the whole run was seed 0: its chain is not run again
      mkdir -p "$RESULTS_DIR/seeds/0" && cp "$RESULTS_DIR"/eval_*.json "$RESULTS_DIR"/{run,tstar}.json "$RESULTS_DIR/seeds/0/"
      echo "seed 0: the whole run's evaluations ($RESULTS_DIR/run.json)"; continue
    fi
    SEED=$s RESULTS_DIR="$RESULTS_DIR/seeds/$s" BUDGET=0 bash "$0" "$MODE" chain
  done
  python report.py "$RESULTS_DIR"
  exit 0
fi
if [ "$PART" = all ]; then  # a whole run replaces the last one's files: a control skipped by BUDGET leaves none
  rm -f "$RESULTS_DIR"/eval_*.json "$RESULTS_DIR"/train_*.json "$RESULTS_DIR"/curves_*.png
fi
LOG="$RESULTS_DIR/run.stages.jsonl"; : > "$LOG"
stage() {  # run one command, log its wall time and exit status
  local t0=$SECONDS rc=0
  echo "== $*"
  "$@" || rc=$?
  python -c 'import json, sys; print(json.dumps({"command": sys.argv[3:], "seconds": int(sys.argv[1]), "exit": int(sys.argv[2])}))' \
    $((SECONDS - t0)) $rc "$@" >> "$LOG"
  return $rc
}
left() { [ $((SECONDS + $1)) -lt "$BUDGET" ]; }  # $1: a control's CPU seconds with its test decode (run.json)
ev() { stage python decode.py $D $DEV $EVAL --split=test "$@"; }
ev_ar() { stage python decode.py $D $DEV $EVAL_AR --split=test "$@"; }

TAU=0.9; SLOT=0  # the setting every diffusion row of the tables decodes at: t*, chosen for RL on validation
SLOTS="(0.9, 0.85, 0.8, 0.7)"  # t* may also commit the list slots at one of these, every other token at 0.3
tstar() { python -c 'import json, sys; t = json.load(open(sys.argv[1])); print(t["tau"], t.get("tau_slot") or 0.0)' \
  "$RESULTS_DIR/tstar.json"; }
seconds_of() { python -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["seconds"]))' "$RESULTS_DIR/train_$1.json"; }

chain() {  # the recipe, each stage from the previous one's checkpoint (OPD and RL train at the fast end), and the
           # main table's rows at t*: what every seed runs
  stage python data_beauty.py --data_dir=${DATA_DIR:-data/beauty} --name=${DATA_NAME:-Beauty}
  stage python train_ar.py $D $NAME $DEV $AR
  ev_ar --ckpt=out/ar.pt --name=ar
  stage python train_cft.py $D $DEV $CFT --block=$BLOCK
  stage python train_opd.py $D $DEV $OPD       # rollouts and the KL at the commit state, at tau 0.6
  stage python train_rl.py $D $DEV $RL         # at tau 0.6, the speed paid beside the rank
  stage python frontier.py --data_dir=${DATA_DIR:-data/beauty} $DEV --split=valid --stages=rl --choose=True \
    --tau_slots="$SLOTS"
  read TAU SLOT < <(tstar); echo "t* = tau $TAU, slots $SLOT (chosen for RL on validation: $RESULTS_DIR/tstar.json)"
  ev --ckpt=out/ar.pt --name=naive --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
  ev --ckpt=out/cft.pt --name=cft --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
  ev --ckpt=out/opd.pt --name=opd --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
  ev --ckpt=out/rl.pt --name=rl --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
}

core() {  # the chain, then its speed at t*, OPD's two controls and the test frontier
  chain
  stage python bench.py --data_dir=${DATA_DIR:-data/beauty} $DEV $BENCH --taus="($TAU,)" --tau_slot=$SLOT  # vs AR
  # the controls of OPD at t*: its loss on the teacher's samples, and more CFT for as long as OPD trained
  stage python train_opd.py $D $DEV $OPD --rollouts=teacher --state=l2r $L2R --out=out/opd_offpolicy.pt
  ev --ckpt=out/opd_offpolicy.pt --name=opd_offpolicy --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
  stage python train_cft.py $D $DEV $MORE --time_limit=$(seconds_of opd) --tau=0.6 --parent=out/cft.pt --out=out/cft_more.pt
  ev --ckpt=out/cft_more.pt --name=cft_more --block=$BLOCK --tau=$TAU --tau_slot=$SLOT
  stage python frontier.py --data_dir=${DATA_DIR:-data/beauty} $DEV --stages=cft,opd,rl,opd_offpolicy \
    --tau_slots="$SLOTS"  # not naive: 4x the forwards
}

ablations() {  # each answers one question about the chain (the most needed first); needs core's out/*.pt
  read TAU SLOT < <(tstar)
  if left 360; then stage python train_ar.py $D $NAME $DEV $DIR --trace=False --out=out/ar_direct.pt && ev_ar --ckpt=out/ar_direct.pt --name=ar_direct; fi
  if left 30; then ev --ckpt=out/cft.pt --name=cft_left --block=$BLOCK --tau=$TAU --tau_slot=$SLOT --from_left=True; fi
  if left 250; then stage python train_rl.py $D $DEV $RL --policy=out/ar.pt --block=1 --out=out/ar_rl.pt && ev_ar --ckpt=out/ar_rl.pt --name=ar_rl --block=1 --tau=$TAU --tau_slot=$SLOT; fi
  if left 680; then stage python train_cft.py $D $DEV $CFT --validity_weight=0.0 --out=out/cft_novalid.pt && ev --ckpt=out/cft_novalid.pt --name=cft_novalid --block=$BLOCK --tau=$TAU --tau_slot=$SLOT; fi
  if left 1200; then stage python train_ar.py $D $NAME $DEV $AR --reject=False --out=out/ar_noreject.pt && ev_ar --ckpt=out/ar_noreject.pt --name=ar_noreject; fi
  if left 180; then stage python train_rl.py $D $DEV $RL --kl_weight=1.0 --out=out/rl_kl.pt && ev --ckpt=out/rl_kl.pt --name=rl_kl --block=$BLOCK --tau=$TAU --tau_slot=$SLOT; fi
  if left 560; then stage python train_cft.py $D $DEV $CFT --block_warmup=$WARM --out=out/cft_warmup.pt && ev --ckpt=out/cft_warmup.pt --name=cft_warmup --block=$BLOCK --tau=$TAU --tau_slot=$SLOT; fi
  if left 560; then stage python train_cft.py $D $DEV $CFT --suffix_share=0.5 --out=out/cft_suffix.pt && ev --ckpt=out/cft_suffix.pt --name=cft_suffix --block=$BLOCK --tau=$TAU --tau_slot=$SLOT; fi
}

case "$PART" in
  all) core; ablations ;;
  core) core ;;
  chain) chain ;;
  ablations) ablations ;;
  *) echo "error: unknown part '$PART' (all, core, chain, ablations or seeds)"; exit 2 ;;
esac
python - "$RESULTS_DIR" "$MODE" "$SEED" <<'PY'
import json, sys
from common import git_commit, write_json
folder, mode, seed = sys.argv[1:]
stages = [json.loads(line) for line in open(f"{folder}/run.stages.jsonl")]
write_json(f"{folder}/run.json", {'commit': git_commit(), 'setting': mode, 'seed': int(seed), 'stages': stages,
                                  'seconds': sum(s['seconds'] for s in stages)})
PY
rm -f "$LOG"
python report.py "$RESULTS_DIR"  # after run.json: the tables name this run's commit
