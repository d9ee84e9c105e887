set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 benchmarks/probe_dense_threads.py --size 16GiB --modes plain --batch-ab 256MiB,512MiB --workers-ab 8,32 --rounds 2 --out $OUT/dense_ab.json 2>&1 | grep -E "warm-up|plain:|round"
python3 -c "
import json;d=json.load(open('$OUT/dense_ab.json'))
for r in [d['warm_up'],d['plain']]+d['variants']: print(r.get('batch_bytes'),r.get('workers'),r['wall_s'],r['delta_path_s'],r['phases'],r['steps_host'].get('slot_wait'),r['device_s'])
"
timeout 330 python3 benchmarks/bench_dense_gpu.py --sizes 50GiB --cpu-sizes "" --batch-bytes 256MiB,256MiB,512MiB --dir /dev/shm/apollo-dense --out $OUT/dense_gpu_54gb.json 2>&1 | grep -E "save|model|ratios"
