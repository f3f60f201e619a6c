#!/usr/bin/env bash
# The whole product on one machine in a few minutes (2 CPU cores are enough; GPUs are used when present):
#   1. the project's sample data (8 commonsense tasks + Alpaca-style records) and a tokenizer trained on it
#   2. packed, memory-mapped shards (data_prep/prepare.py)
#   3. the tiny LLaMA base of configs/tiny.yaml, saved with random weights so evaluation loads the same model
#   4. MixLoRA training with DeepSpeed ZeRO-3 (2 CPU ranks on gloo, or one rank per GPU), checkpoints,
#      TensorBoard, adapter export
#   5. accuracy of the base alone and of base + adapter on the held-out split of every task
#
#   bash launch/demo.sh [OUT_DIR]     (default runs/demo; environment: EPOCHS=3, STEPS=<all>, and
#                                      DS_ACCELERATOR / NPROC: default the GPUs torch sees, one rank
#                                      each, else cpu with 2 ranks)
# Afterwards: tensorboard --logdir OUT_DIR/run/tensorboard
#
#   MODEL=smollm2 bash launch/demo.sh [OUT_DIR]   the same pipeline on a real pretrained model
#                                                 (SmolLM2-135M-Instruct): launch/demo_real.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${MODEL:-tiny}" = smollm2 ]; then
    exec bash launch/demo_real.sh "$@"
elif [ "${MODEL:-tiny}" != tiny ]; then
    echo "error: MODEL=${MODEL}: expected tiny (default) or smollm2" >&2
    exit 2
fi
# Set-up on first use: a .venv with torch and mixlora_ds (reused when already there or active).
# shellcheck disable=SC1091
. scripts/setup_env.sh
set -u
OUT=${1:-runs/demo}
EPOCHS=${EPOCHS:-3}
STEPS=${STEPS:-}
PY=${PYTHON:-python}
# The GPUs when torch sees any (one rank each), else 2 CPU ranks; DS_ACCELERATOR / NPROC override.
# shellcheck disable=SC1091
. scripts/detect_accelerator.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# A private JIT cache: a killed build elsewhere cannot leave a lock that hangs this run.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}
PORT=${MASTER_PORT:-$(( 29600 + RANDOM % 2000 ))}
TASKS=arc-e,arc-c,boolq,obqa,piqa,siqa,hellaswag,winogrande
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/5 sample data and tokenizer -> $OUT/sample, $OUT/tokenizer"
"$PY" -c "import sys; from mixlora_ds.data.sample_data import write_sample_data; write_sample_data(sys.argv[1])" "$OUT/sample"
"$PY" data_prep/build_tokenizer.py --input "$OUT/sample" --out "$OUT/tokenizer" --vocab-size 1024

step "2/5 tokenize and pack -> $OUT/data"
"$PY" data_prep/prepare.py --mixture "$OUT/sample/mixture.yaml" --tokenizer "$OUT/tokenizer" --seq-len 256 \
    --out "$OUT/data" --overwrite --no-progress

step "3/5 tiny base with random weights -> $OUT/base"
"$PY" launch/make_base.py --run-config configs/tiny.yaml --tokenizer "$OUT/tokenizer" --out "$OUT/base"

step "4/5 train: deepspeed, $NPROC ranks on $DS_ACCELERATOR, ZeRO-3 -> $OUT/run"
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config configs/tiny.yaml \
    --model.name_or_path "$OUT/base" --data.train_dir "$OUT/data" --output_dir "$OUT/run" \
    --schedule.num_epochs "$EPOCHS" ${STEPS:+--max_steps "$STEPS"} --logging.progress_bar false \
    --overwrite  # a demo run again replaces its previous run (training refuses to mix two runs)
# The launcher's shared-memory segments (if its CPU all-reduce op was ever built) outlive the run.
rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true

step "5/5 evaluate on the held-out split: base alone, then base + adapter"
"$PY" launch/evaluate.py --base-model "$OUT/base" --tasks "$TASKS" --data-dir "$OUT/sample" --split eval \
    --scoring label-loglik --method base --output "$OUT/eval_base.json" --markdown "$OUT/eval_base.md" --no-progress
"$PY" launch/evaluate.py --base-model "$OUT/base" --adapter "$OUT/run/adapter" --tasks "$TASKS" \
    --data-dir "$OUT/sample" --split eval --scoring label-loglik --method mixlora \
    --output "$OUT/eval_adapter.json" --markdown "$OUT/eval_adapter.md" --no-progress
echo
echo "done in $(( $(date +%s) - t0 ))s: adapter $OUT/run/adapter, TensorBoard $OUT/run/tensorboard"
