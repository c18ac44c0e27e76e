mkdir -p /tmp/site; [ -d /tmp/site/nixl_cu13 ] || tar -C /tmp/site -xJf .whl/site.tar.xz; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; rm -rf .git
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python -m pdlaunch bench make-checkpoint /dev/shm/l8b --device cuda > $OUT/ckpt.log 2>&1; echo "== ckpt rc $?"
for lim in 8192 2048; do
  PDLAUNCH_MIXED_GRAPH_TOKENS=$lim timeout 150 python benchmarks/engine_speed.py /dev/shm/l8b --json $OUT/l8b-$lim.json > $OUT/l8b-$lim.log 2>&1; echo "== 8b $lim rc $?"; grep -i "prefill" $OUT/l8b-$lim.log | cut -c1-400 | tail -3
done
for lim in 8192 2048; do
  PDLAUNCH_MIXED_GRAPH_TOKENS=$lim timeout 150 python benchmarks/moe_speed.py --batch 1 --steps 8 --prefill 3072 8192 --json $OUT/moe-$lim.json > $OUT/moe-$lim.log 2>&1; echo "== moe $lim rc $?"; grep prefill_tokens $OUT/moe-$lim.log | cut -c1-200
done
timeout 240 python -m pytest -q -m gpu tests/engine tests/model/test_moe_gpu.py -p no:cacheprovider 2>&1 | tail -5
