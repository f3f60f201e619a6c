#!/usr/bin/env bash
# A short real training on whatever is installed: sample data -> tokenizer -> shards -> 2-rank
# DeepSpeed ZeRO-3 on configs/tiny.yaml (random base), a few steps, adapter export. CI runs it on
# the plain install (no extras) to prove that install trains.
#   bash scripts/smoke_train.sh [OUT_DIR]     (default: a temporary directory, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-}
if [ -z "$OUT" ]; then
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
fi
PY=${PYTHON:-python}
# shellcheck disable=SC1091
. scripts/detect_accelerator.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions"
PORT=${MASTER_PORT:-$(( 29600 + RANDOM % 2000 ))}
"$PY" -c "import sys; from mixlora_ds.data.sample_data import write_sample_data; write_sample_data(sys.argv[1], train_size=64, eval_size=8)" "$OUT/sample"
"$PY" data_prep/build_tokenizer.py --input "$OUT/sample" --out "$OUT/tokenizer" --vocab-size 512 >/dev/null
"$PY" data_prep/prepare.py --mixture "$OUT/sample/mixture.yaml" --tokenizer "$OUT/tokenizer" --seq-len 128 \
    --out "$OUT/data" --no-progress >/dev/null
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config configs/tiny.yaml \
    --data.train_dir "$OUT/data" --output_dir "$OUT/run" --max_steps 4 --checkpoint.every_steps 0 \
    --eval.every_steps 0 --eval.at_end false --logging.every_steps 1 --logging.progress_bar false
test -f "$OUT/run/adapter/adapter_model.safetensors"
echo "smoke training OK: $NPROC ranks on $DS_ACCELERATOR, ZeRO-3, adapter $OUT/run/adapter"
