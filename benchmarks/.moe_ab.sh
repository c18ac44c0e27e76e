mkdir -p /tmp/site; [ -d /tmp/site/nixl_cu13 ] || tar -C /tmp/site -xJf .whl/site.tar.xz; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; rm -rf .git
source benchmarks/steps.sh $OUT
timeout 150 python -m pytest -q -m gpu tests/engine/test_mixed_graphs.py tests/model/test_moe_gpu.py -p no:cacheprovider 2>&1 | tail -2
step ckpt 120 python -m pdlaunch bench make-checkpoint --shape qwen3-30b-a3b --device cuda /dev/shm/q3
for lim in default 2048; do
  env $( [ $lim = default ] || echo PDLAUNCH_MIXED_GRAPH_TOKENS=$lim ) python -m pdlaunch serve --model /dev/shm/q3 --colocated --max-model-len 4096 --port 8000 > $OUT/serve-$lim.log 2>&1 &
  pid=$!
  wait_ready 8000 $pid 200 || tail -5 $OUT/serve-$lim.log
  TAIL=14 step bench-$lim 120 python -m pdlaunch bench serve --base-url http://127.0.0.1:8000 --num-prompts 32 --num-warmups 2 --random-input-len 3072 --random-output-len 128 --request-rate 2 --save-result --result-dir $OUT --result-filename moe-serve-$lim.json
  grep -h "captured piecewise" $OUT/serve-$lim.log $OUT/logs*/*colocated* 2>/dev/null | cut -c1-200 | head -2
  stop_server $pid
done
