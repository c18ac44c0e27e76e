mkdir -p /tmp/site; [ -d /tmp/site/nixl_cu13 ] || tar -C /tmp/site -xJf .whl/site.tar.xz
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
source benchmarks/steps.sh $OUT/x
TAIL=10 step gpu-tests 250 $py -m pytest -q -p no:cacheprovider -m gpu tests/model tests/quant
step ckpt 100 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=12 step grid 130 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 1x8000 128x512 1x128 --steps 32 --kernel-profile 1x128 --json $out/grid.json
TAIL=6 step grid-fp8kv 80 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 --steps 32 --kv-cache-dtype fp8 --json $out/grid-fp8kv.json
rm -rf /tmp/l8b
step ckpt-fp8 100 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=40 step grid-fp8w 90 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --cells 1x8000 --steps 32 --kernel-profile 1x128 --json $out/grid-fp8w.json
