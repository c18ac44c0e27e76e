#!/bin/bash
# fp8 experts without activation quantization launches (a tile's `f16_products`, or `inline_quant` with fp8
# activations) on one GPU, one call: the fp8 MoE GPU tests, the swapped-tile fp8 sweep at decode sizes with every mode (writes
# configs/<device>_fp8.json, copied to OUT_DIR), then the Qwen3-30B-A3B shape's batch-64 step with block-FP8
# experts and attention and an fp8 KV cache under the new tile file and under the committed one (OLD_TILES, a
# copy of it), alternating. A second call (MODE=ratio) times the bf16 step beside the new one (issue 27's <= 0.65x).
# Usage: OLD_TILES=old_fp8.json bash benchmarks/moe_quant_round.sh OUT_DIR; MODE=ratio bash ... OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=pdlaunch/model/moe/configs/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '__')_fp8.json
fp8_step() {  # NAME: the batch-64 fp8 step with the tile file now in place
    TAIL=1 step "$1" 120 $py benchmarks/moe_speed.py --batch 64 --steps 40 --prefill 0 --fp8-experts \
        --fp8-attention --kv-cache-dtype fp8 --json "$out/$1.json"
}
if [ "${MODE:-sweep}" = sweep ]; then
    TAIL=6 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider tests/quant/test_fp8_moe_gpu.py
    TAIL=8 step moe-kernels-fp8 260 $py benchmarks/moe_kernels.py --fp8 --swapped-only --write-config \
        --tokens 1 16 64 256 --json "$out/moe-kernels-fp8.json"
    cp "$tiles" "$out/new_fp8_tiles.json"
    fp8_step moe-fp8-b64-new
    cp "${OLD_TILES:?OLD_TILES}" "$tiles"; fp8_step moe-fp8-b64-old
    cp "$out/new_fp8_tiles.json" "$tiles"; fp8_step moe-fp8-b64-new2
else
    fp8_step moe-fp8-b64-a
    TAIL=1 step moe-bf16-b64 150 $py benchmarks/moe_speed.py --batch 64 --steps 40 --prefill 0 --json "$out/moe-bf16-b64.json"
    fp8_step moe-fp8-b64-b
    TAIL=1 step moe-fp8-b1 120 $py benchmarks/moe_speed.py --batch 1 --steps 40 --prefill 0 --fp8-experts \
        --fp8-attention --kv-cache-dtype fp8 --json "$out/moe-fp8-b1.json"
fi
