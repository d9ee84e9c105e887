set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 benchmarks/probe_dense_threads.py --size 16GiB --modes plain --switch-intervals 0.005,0.001,0.0002 --rounds 2 --out $OUT/dense_switch.json 2>&1 | grep -E "warm-up|plain:|round|interval"
python3 -c "
import json;d=json.load(open('$OUT/dense_switch.json'))
for r in [d['warm_up'],d['plain']]+d['switch_intervals']: print(r.get('switch_interval_s'),r['wall_s'],r['cpu_s'],r['delta_path_s'],r['phases'],r['steps_host'].get('check'),r['device_s'])
"
for si in 0.005 0.0005; do
timeout 170 python3 benchmarks/bench_dense_gpu.py --sizes 50GiB --cpu-sizes "" --batch-bytes 256MiB,256MiB --switch-interval $si --dir /dev/shm/apollo-dense --out $OUT/dense_gpu_54gb_si$si.json 2>&1 | grep -E "save \(|model"
python3 -c "
import json;d=json.load(open('$OUT/dense_gpu_54gb_si$si.json'));r=d['runs'][0]
for k,v in r.items():
  if isinstance(v,dict) and 'wall_s' in v: print(k, v['wall_s'], v['cpu_s'], v['phases'])
"
done
