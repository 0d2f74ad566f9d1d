#!/usr/bin/env bash
# The whole recipe for one seed, then the two tables:
#   data -> AR teacher (+ no-trace and no-rejection ablations) -> naive conversion -> CFT (+ no-validity ablation)
#   -> OPD (+ off-policy control) -> RL (+ RL-tuned AR, + a KL penalty) -> test evaluation -> bench -> report
#   (+ CFT committed from the left, + CFT with the rare judgements weighed up, + CFT with a block-size warm-up,
#   + CFT with suffix masks)
#
#   bash run.sh                  # one GPU, default config
#   bash run.sh cpu              # this kind of 2-core CPU: a small model and short stages, labelled CPU in results/
#   bash run.sh gpu core         # only the chain (data ... rl, bench); `ablations` runs the ten controls after it
# Environment: DATA_DIR (default data/beauty), SEED (default 0), BUDGET (seconds; optional stages
# are skipped once it is spent, so a time-boxed run still ends with the tables).
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-gpu}
PART=${2:-all}
SEED=${SEED:-0}
D="--data_dir=${DATA_DIR:-data/beauty} --seed=$SEED"
if [ "$MODE" = cpu ]; then
  export RESULTS_DIR=${RESULTS_DIR:-results/cpu}  # never mixed with the GPU numbers in results/
  BUDGET=${BUDGET:-1500}                           # the controls only while the half hour lasts
  DEV="--device=cpu"
  SIZE="--n_layer=2 --n_embd=128 --n_head=4"
  AR="$SIZE --batch_size=32 --mid_steps=0 --max_steps=1000 --eval_every=500 --eval_n=600 --eval_batch=300"
  DIR="$AR"
  SMALL="--eval_n=64 --eval_batch=64"   # stage evaluations (selection) on the first 64 validation users
  CFT="--batch_size=16 --max_steps=100 --eval_every=50 --lr=1e-4 --sweep=False --judge=False $SMALL"  # lr 5e-4: validity 0.08
  WARM=50
  OPD="--n_prompts=2 --max_steps=3 --eval_every=3 $SMALL"
  MORE="--batch_size=16 --max_steps=20 --eval_every=20 --lr=1e-4 --sweep=False --judge=False $SMALL"
  RL="--n_prompts=2 --max_steps=2 --eval_every=2 $SMALL"
  BENCH="--batches=(1,16) --graphs=(False,) --n_time=16 --n_time_b1=4 --repeats=1 --accuracy=False"
  EVAL="--batch_size=100 --limit=100"   # diffusion: the first 100 test users (in user order), block decoding
  EVAL_AR="--batch_size=300"            # is slow on a CPU; AR decodes the whole test set in about 30 s
else
  BUDGET=${BUDGET:-100000}
  DEV=""
  AR="--time_limit=80"; DIR="--time_limit=30"
  CFT="--time_limit=60"; WARM=200; OPD="--time_limit=30"; MORE="--max_steps=300 --time_limit=30"; RL="--time_limit=30"
  BENCH="--graphs=(True,) --repeats=2 --n_time_b1=8"
  EVAL="--batch_size=512"
  EVAL_AR="$EVAL"
fi
left() { [ "$SECONDS" -lt "$BUDGET" ]; }
ev() { python decode.py $D $DEV $EVAL --split=test "$@"; }
ev_ar() { python decode.py $D $DEV $EVAL_AR --split=test "$@"; }

core() {  # the recipe's chain, each stage from the previous one's checkpoint
  python data_beauty.py ${DATA_DIR:+--data_dir=$DATA_DIR}
  python train_ar.py $D $DEV $AR
  ev_ar --ckpt=out/ar.pt --name=ar
  ev --ckpt=out/ar.pt --name=naive --block=32 --tau=0.9
  python train_cft.py $D $DEV $CFT
  ev --ckpt=out/cft.pt --name=cft --block=32 --tau=0.9
  python train_opd.py $D $DEV $OPD
  ev --ckpt=out/opd.pt --name=opd --block=32 --tau=0.9
  python train_rl.py $D $DEV $RL
  ev --ckpt=out/rl.pt --name=rl --block=32 --tau=0.9
  python bench.py ${DATA_DIR:+--data_dir=$DATA_DIR} $DEV $BENCH   # the latest stage (rl) against the AR teacher
}

ablations() {  # each answers one question about the chain; needs out/ar.pt and out/cft.pt from core
  if left; then ev --ckpt=out/cft.pt --name=cft_left --block=32 --tau=0.9 --from_left=True; fi
  if left; then python train_cft.py $D $DEV $CFT --sweep=False --change_boost=10 --choice_boost=10 --from_left=True --out=out/cft_change.pt --name=cft_change && ev --ckpt=out/cft_change.pt --name=cft_change --block=32 --tau=0.9 --from_left=True; fi
  if left; then python train_ar.py $D $DEV $DIR --trace=False --out=out/ar_direct.pt && ev_ar --ckpt=out/ar_direct.pt --name=ar_direct; fi
  if left; then python train_cft.py $D $DEV $CFT --sweep=False --validity_weight=0.0 --out=out/cft_novalid.pt --name=cft_novalid && ev --ckpt=out/cft_novalid.pt --name=cft_novalid --block=32 --tau=0.9; fi
  if left; then python train_cft.py $D $DEV $MORE --parent=out/cft.pt --out=out/cft_more.pt --name=cft_more && ev --ckpt=out/cft_more.pt --name=cft_more --block=32 --tau=0.9; fi
  if left; then python train_rl.py $D $DEV $RL --policy=out/ar.pt --block=1 --out=out/ar_rl.pt --name=ar_rl && ev_ar --ckpt=out/ar_rl.pt --name=ar_rl --block=1 --tau=0.9; fi
  if left; then python train_ar.py $D $DEV $AR --reject=False --out=out/ar_noreject.pt --name=ar_noreject && ev_ar --ckpt=out/ar_noreject.pt --name=ar_noreject; fi
  if left; then python train_rl.py $D $DEV $RL --kl_weight=1.0 --out=out/rl_kl.pt --name=rl_kl && ev --ckpt=out/rl_kl.pt --name=rl_kl --block=32 --tau=0.9; fi
  if left; then python train_cft.py $D $DEV $CFT --sweep=False --block_warmup=$WARM --out=out/cft_warmup.pt --name=cft_warmup && ev --ckpt=out/cft_warmup.pt --name=cft_warmup --block=32 --tau=0.9; fi
  if left; then python train_cft.py $D $DEV $CFT --sweep=False --suffix_share=0.5 --out=out/cft_suffix.pt --name=cft_suffix && ev --ckpt=out/cft_suffix.pt --name=cft_suffix --block=32 --tau=0.9; fi
}

case "$PART" in
  all) core; ablations ;;
  core) core ;;
  ablations) ablations ;;
  *) echo "error: unknown part '$PART' (all, core or ablations)"; exit 2 ;;
esac
python report.py "${RESULTS_DIR:-results}"
