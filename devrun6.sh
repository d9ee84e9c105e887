set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
git log --oneline -1 2>/dev/null
timeout 120 python3 benchmarks/probe_dense_threads.py --size 16GiB --modes plain --switch-intervals 0.001,0 --rounds 2 --out $OUT/final_dense17_probe.json 2>&1 | grep -E "warm-up|plain:|interval"
timeout 200 python3 benchmarks/bench_dense_gpu.py --sizes 16GiB --cpu-sizes 16GiB --steps 2 --batch-bytes 256MiB,256MiB --dir /dev/shm/apollo-dense --out $OUT/final_dense17.json 2>&1 | grep -E "save \(|ratios"
timeout 150 python3 benchmarks/bench_dense_gpu.py --sizes 50GiB --cpu-sizes "" --batch-bytes 256MiB,256MiB --dir /dev/shm/apollo-dense --out $OUT/final_dense54.json 2>&1 | grep -E "save \("
