set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl .whl3/*.whl || exit 1
export PYTHONUNBUFFERED=1
NEW=/tmp/site:$PWD OLD=$PWD/ab_base:/tmp/site
TRITON_INTERPRET=0 PYTHONPATH=$NEW timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
P="benchmarks/probe_dense_threads.py --size 16GiB --rounds 1"
for r in 1 2; do
  PYTHONPATH=$OLD timeout 120 python3 $P --modes plain --out $OUT/r${r}_old.json 2>&1 | grep -E "warm-up|plain:" 
  if [ $r = 2 ]; then X="--modes plain,gil --py-spy /tmp/site/bin/py-spy"; else X="--modes plain --workers-ab 32"; fi
  PYTHONPATH=$NEW timeout 150 python3 $P $X --out $OUT/r${r}_new.json 2>&1 | grep -E "warm-up|plain:|gil:|workers"
done
