source benchmarks/steps.sh $OUT/r4
TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/quant/test_fp8_gpu.py tests/model/test_triton_decode.py
TAIL=40 step gemms 150 $py benchmarks/fp8_bench.py --skip-model --json "$out/fp8-gemms.json"
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=50 step grid-fp8w 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --cells 1x8000 --steps 32 --kernel-profile 1x128 --json "$out/grid-fp8w.json"
rm -rf /tmp/l8b-fp8
step ckpt 100 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=90 step grid-bf16 100 $py benchmarks/decode_grid.py /tmp/l8b --batch 1 --context 128 --cells 64x1024 --steps 32 --kernel-profile 1x128 64x1024 --json "$out/grid-bf16.json"
