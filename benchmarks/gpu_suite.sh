#!/usr/bin/env bash
# Every GPU measurement of benchmarks/, in one go, on a machine with 1 or 2 NVIDIA GPUs.
# Run from the repository root: bash benchmarks/gpu_suite.sh OUTDIR
# Carried wheels in .whl/ (DeepSpeed and what it needs) are installed first when present.
# Single-GPU measurements run on GPU 0 one after another, so their timings do not disturb
# each other; the quality runs (throughput-insensitive) run on the last GPU alongside them.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || echo "editable install failed (see install.log)"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
last=$((ngpu - 1))
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >"$out/machine.txt" 2>&1

run() {  # name, then the command
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/suite.log"
  local t0=$SECONDS
  "$@" >"$out/$name.txt" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$out/suite.log"
}

# Quality runs in the background on the last GPU.
if [ -n "${QUALITY:-1}" ] && [ "$QUALITY" != 0 ]; then
  ( [ -f benchmarks/dst_quality.py ] && CUDA_VISIBLE_DEVICES=$last run dst_quality python3 benchmarks/dst_quality.py --device cuda ${DST_ARGS:-}
    [ -f benchmarks/nm_quality.py ] && CUDA_VISIBLE_DEVICES=$last run nm_quality python3 benchmarks/nm_quality.py --device cuda ${NM_ARGS:-} ) &
  quality=$!
fi

export CUDA_VISIBLE_DEVICES=0
[ -f benchmarks/gpu_topk.py ] && run gpu_topk python3 benchmarks/gpu_topk.py
[ -f benchmarks/gpu_nm_overhead.py ] && run gpu_nm_overhead python3 benchmarks/gpu_nm_overhead.py
[ -f benchmarks/dst_overhead.py ] && run dst_overhead python3 benchmarks/dst_overhead.py --device cuda
unset CUDA_VISIBLE_DEVICES
if [ "$ngpu" -ge 2 ]; then
  [ -f benchmarks/gpu_hook_overhead.py ] && run gpu_hook_overhead torchrun --standalone --nproc-per-node 2 benchmarks/gpu_hook_overhead.py
  run gpu_lightning_deepspeed python3 benchmarks/gpu_lightning_deepspeed.py --devices 2 --steps 60
else
  run gpu_lightning_deepspeed python3 benchmarks/gpu_lightning_deepspeed.py --devices 1 --steps 60
fi
run gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider tests
[ -n "${quality:-}" ] && wait "$quality"
echo "done" | tee -a "$out/suite.log"
