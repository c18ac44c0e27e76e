source benchmarks/steps.sh $OUT/r5
TAIL=12 step gemv 200 $py benchmarks/fp8_bench.py --gemv-sweep --skip-model --json "$out/fp8-gemv.json"
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=4 step grid-fp8w 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --cells 1x8000 --steps 32 --json "$out/grid-fp8w.json"
