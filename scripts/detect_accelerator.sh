# Source this to choose where the demo and CI runs train: exports DS_ACCELERATOR and NPROC.
#   DS_ACCELERATOR unset: "cuda" with one rank per visible GPU when torch sees GPUs, else "cpu" with
#   2 ranks (gloo). An explicit DS_ACCELERATOR or NPROC is kept. PYTHON names the interpreter.
_gpus=0
if [ -z "${DS_ACCELERATOR:-}" ] || [ "${DS_ACCELERATOR}" = cuda ]; then
    _gpus=$("${PYTHON:-python}" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
fi
if [ -z "${DS_ACCELERATOR:-}" ]; then
    if [ "$_gpus" -gt 0 ]; then DS_ACCELERATOR=cuda; else DS_ACCELERATOR=cpu; fi
fi
if [ -z "${NPROC:-}" ]; then
    if [ "$DS_ACCELERATOR" = cuda ] && [ "$_gpus" -gt 0 ]; then NPROC=$_gpus; else NPROC=2; fi
fi
export DS_ACCELERATOR NPROC
unset _gpus
