set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl .whl3/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
timeout 240 python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
timeout 330 python3 benchmarks/probe_dense_threads.py --size 16GiB --py-spy /tmp/site/bin/py-spy --modes plain,idle,gil --batch-ab 256MiB,512MiB,1GiB --rounds 1 --out $OUT/dense_threads.json 2>&1 | grep -v "^ *[0-9]* .*site-packages" | tail -120
