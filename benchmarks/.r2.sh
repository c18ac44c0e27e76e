mkdir -p /tmp/site; [ -d /tmp/site/nixl_cu13 ] || tar -C /tmp/site -xJf .whl/site.tar.xz
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
source benchmarks/steps.sh $OUT/x
TAIL=6 step moe-tests 200 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_moe_router.py tests/model/test_moe_gpu.py tests/quant/test_fp8_moe_gpu.py
TAIL=9 step moe-bf16 200 $py benchmarks/moe_speed.py --json "$out/moe-bf16.json"
TAIL=7 step moe-fp8 170 $py benchmarks/moe_speed.py --fp8-experts --fp8-attention --batch 1 16 64 --json "$out/moe-fp8.json"
