# The GPU timeline of whole engine steps (decode_grid.py --step-trace): the 8B shape at 1 x 128 with 128x128-block
# FP8 weights, then bf16 at 1 x 128 and 128 x 512. Usage: bash benchmarks/trace_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
step ckpt-fp8 150 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=3 step grid-fp8 200 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --steps 32 --step-trace 1x128 --kernel-profile 1x128 --json "$out/grid-fp8-trace.json"
rm -rf /tmp/l8b-fp8
step ckpt-bf16 150 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=3 step grid-bf16 200 $py benchmarks/decode_grid.py /tmp/l8b --batch 1 --context 128 --cells 128x512 --steps 32 --step-trace 1x128 128x512 --json "$out/grid-bf16-trace.json"
