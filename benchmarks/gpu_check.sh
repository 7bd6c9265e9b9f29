#!/usr/bin/env bash
# GPU check (issue 11): the CUDA tests, then training, evaluation, ingest and query figures on one
# GPU, in at most 8 minutes (each step has its own time limit; the budgets add up to 7.8 min).
#
# Run from anywhere, in an environment with felrec-stream installed (pip install -e '.[dev]'; add
# faiss-gpu where it installs, else faiss-cpu serves and the encoder alone runs on the GPU):
#     bash benchmarks/gpu_check.sh
# Fails at once without CUDA. Paste the printed figures, with the date and the GPU's name, into the
# README's benchmark section.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
PY=${PYTHON:-python}
status=0
step() {  # step <seconds> <title> <command...>: a failed or timed-out step is reported, the rest still run
    local limit=$1 title=$2
    shift 2
    echo "== $title (limit ${limit}s)"
    local start=$SECONDS
    if ! timeout "$limit" "$@"; then
        echo "!! $title failed or ran past ${limit}s"
        status=1
    fi
    echo "   ($((SECONDS - start)) s)"
}

date -u +"%Y-%m-%d %H:%M UTC"
$PY - <<'PYEOF'
import faiss
import torch

if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch: this check needs a GPU")
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"faiss {faiss.__version__} with {gpus} GPU(s) ({'GPU flat index' if gpus else 'CPU index, GPU encoder'})")
PYEOF

# The tests that need CUDA (skipped on CPU machines) and the GPU branch of the FAISS store; -rs
# lists any skip, which here would mean a test did not find the GPU.
step 80 "CUDA tests" $PY -m pytest -q -rs -p no:cacheprovider \
    tests/felrec_stream/state/test_faiss_store.py tests/pipelines/test_worker_in_memory.py -k "cuda or gpu"

# FLOP-based figures (issue 21): each benchmark below measures the GPU's fp32 (and bf16) matmul
# peak in its own run and prints the encoder's achieved GFLOP/s per wall-second and its share of
# that peak (per wall-second on CUDA: the GPU's time is not CPU time); this step prints the peaks alone.
step 20 "measured matmul peaks: the GPU, and the CPU beside it (2 threads)" \
    bash -c "$PY benchmarks/flop_rate.py 1 cuda && $PY benchmarks/flop_rate.py 2 cpu"

step 110 "training and evaluation (preset paper: d=128, 3 layers, batch 1024; synthetic events)" \
    $PY benchmarks/bench_train_eval.py --device cuda --preset paper --train-batches 8

step 80 "ingest: worker end to end vs the bare encoder (paper size)" \
    $PY benchmarks/bench_worker.py --device cuda --sizes paper --events 10000 --repeats 1

step 180 "queries at 1M items: IVF sweep, exact flat, under writes (encoder on the GPU)" \
    $PY benchmarks/bench_query.py --device cuda --items 1000000 --queries 300 --index-types ivf,flat \
    --nprobe 8,16,32 --weights 0.3 --write-seconds 10

exit $status
