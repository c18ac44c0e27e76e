mkdir -p /tmp/site; [ -d /tmp/site/nixl_cu13 ] || tar -C /tmp/site -xJf .whl/site.tar.xz
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
source benchmarks/steps.sh $OUT/x
TAIL=3 step router-tests 60 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_moe_router.py
TAIL=4 step moe-prof 150 $py benchmarks/moe_speed.py --batch 1 64 --prefill 512 --kernel-profile 1 64 --json "$out/moe-prof.json"
TAIL=14 step rest-gpu 380 $py -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/model --ignore=tests/quant
