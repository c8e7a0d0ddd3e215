#!/usr/bin/env bash
# The GPU benchmarks of a hot path on two trees, interleaved in one call on one machine, so that a
# change is compared with the release before it on the same host:
#
#   bash benchmarks/ab_gpu.sh PREV_TREE OUTDIR [topk] [dst] [lightning] [nm] [sparse24] [tests]
#
# PREV_TREE is a checkout of the previous release (e.g. `git archive <commit> | tar -x -C .prev`).
# Each tree is installed into its own folder (pip --target, so `sparsetrain.callbacks` resolves) and
# each benchmark runs A, B, A, B, ... ROUNDS times (default 2); the raw outputs go to OUTDIR/<bench>.txt.
# A benchmark's arguments can be replaced through TOPK_ARGS, DST_ARGS, LIGHTNING_ARGS, NM_ARGS, SPARSE24_ARGS
# (each tree keeps its own runtime dispatch-table cache); `tests` runs
# this tree's GPU tests (TEST_PATHS) once.
# Carried wheels in .whl/ (e.g. lightning) are installed first when present.
set -uo pipefail
prev=$1
out=$2
shift 2
what=${*:-topk dst lightning nm}
rounds=${ROUNDS:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
base=/tmp/ab-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$base/wheels" .whl/*.whl
fi
for tree in prev cur; do
  src=$([ "$tree" = prev ] && echo "$prev" || echo .)
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target "$base/$tree" "$src" \
    >"$out/install_$tree.log" 2>&1 || { echo "install of $tree failed"; cat "$out/install_$tree.log"; exit 1; }
  # The scripts put their tree's root first on sys.path: run each tree's copy from beside its install,
  # where `sparsetrain.callbacks` is a real subpackage.
  cp -r "$src/benchmarks" "$base/$tree/benchmarks"
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

bench() {  # name, then the script and its arguments (each tree's copy, against its own install)
  local name=$1; shift
  for r in $(seq "$rounds"); do
    for tree in prev cur; do
      echo "== $name round $r tree $tree: $*" | tee -a "$out/$name.txt"
      (cd "$base/$tree" && SPARSETRAIN_CACHE_DIR="/tmp/ab-cache-$tree" PYTHONPATH="$base/$tree:$base/wheels" \
        python3 "$@") >>"$out/$name.txt" 2>&1
      echo "   exit $?" | tee -a "$out/$name.txt"
    done
  done
}

for w in $what; do
  case $w in
    topk) bench gpu_topk benchmarks/gpu_topk.py ${TOPK_ARGS:---sizes 100000000 --reps 50} ;;
    dst) bench dst_overhead benchmarks/dst_overhead.py --device cuda ${DST_ARGS:---rounds 3} ;;
    lightning) bench dst_lightning_overhead benchmarks/dst_lightning_overhead.py ${LIGHTNING_ARGS:---rounds 3} ;;
    nm)  # the dense anchor, the default parametrization and in-place masking (variant names hold spaces)
      if [ -n "${NM_ARGS:-}" ]; then bench gpu_nm_overhead benchmarks/gpu_nm_overhead.py $NM_ARGS
      else bench gpu_nm_overhead benchmarks/gpu_nm_overhead.py --repeats 3 --variants dense srste "srste, inplace"; fi ;;
    sparse24) bench sparse24_speed benchmarks/sparse24_speed.py \
      ${SPARSE24_ARGS:---parts layer --dtypes bf16 --shapes 4096x4096,11008x4096 --tokens 1,16,4096} ;;
    tests)  # the GPU tests of this tree (not timed)
      (cd "$base/cur" && cp -r "$OLDPWD/tests" . && PYTHONPATH="$base/cur:$base/wheels" \
        python3 -m pytest -m gpu -q -p no:cacheprovider ${TEST_PATHS:-tests}) >"$out/gpu_tests.txt" 2>&1
      echo "== gpu tests: exit $? ($(tail -n 1 "$out/gpu_tests.txt"))" ;;
    *) echo "unknown benchmark $w (topk, dst, lightning, nm, sparse24, tests)"; exit 2 ;;
  esac
done
echo done
