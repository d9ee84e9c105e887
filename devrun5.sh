set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 150 python3 benchmarks/probe_dense_threads.py --size 16GiB --modes plain --switch-intervals 0,0.001,0.0005 --rounds 3 --out $OUT/dense_switch17.json 2>&1 | grep -E "warm-up|plain:|interval"
for si in 0.001 none; do
  X=""; [ $si != none ] && X="--delta-switch-interval $si"
  timeout 130 python3 benchmarks/bench_dense_gpu.py --sizes 50GiB --cpu-sizes "" --batch-bytes 256MiB,256MiB $X --dir /dev/shm/apollo-dense --out $OUT/dense54_$si.json 2>&1 | grep -E "save \("
done
