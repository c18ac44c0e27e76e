#!/bin/bash
# W8A8 experts without quantization launches (issue 27's Qwen3-30B-A3B batch-64 point): the decoder's
# post-attention norm writes the experts' input in fp8 (fused_add_rms_norm_fp8) and a tile's `fused_act_quant`
# quantizes the SiLU-and-mul product in the up kernel's epilogue. One GPU, two calls.
# MODE=sweep (default): the fp8 MoE and fused-op GPU tests, then the swapped-tile fp8 sweep at 16, 64 and 256 tokens
#   (every mode, the fused one too), whose best tile per size replaces that size's entry of the committed
#   configs/<device>_fp8.json (copied to OUT_DIR), then the batch-64 fp8 step under it.
# MODE=ratio: the batch-64 step with block-FP8 experts and attention and an fp8 KV cache, the bf16 one, the fp8 one
#   again, and the fp8 batch-1 step (issue 27: fp8 / bf16 <= 0.65x at batch 64).
# Usage: bash benchmarks/moe_fused_quant_round.sh OUT_DIR; MODE=ratio bash ... OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=pdlaunch/model/moe/configs/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '__')_fp8.json
fp8_step() {  # NAME BATCH
    TAIL=1 step "$1" 120 $py benchmarks/moe_speed.py --batch "$2" --steps 40 --prefill 0 --fp8-experts \
        --fp8-attention --kv-cache-dtype fp8 --json "$out/$1.json"
}
if [ "${MODE:-sweep}" = sweep ]; then
    TAIL=6 step gpu-tests 170 $py -m pytest -q -p no:cacheprovider tests/quant/test_fp8_moe_gpu.py \
        tests/model/test_fused_ops.py -m gpu
    TAIL=8 step moe-kernels-fp8 280 $py benchmarks/moe_kernels.py --fp8 --swapped-only --tokens 16 64 256 \
        --json "$out/moe-kernels-fp8.json"
    $py - "$out/moe-kernels-fp8.json" "$tiles" <<'PY'
import json, sys
doc, path = json.load(open(sys.argv[1])), sys.argv[2]
tiles = json.load(open(path))
fields = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "fp8_activations", "swap_ab", "f16_products",
          "fused_act_quant")
for row in doc["rows"]:
    for entry in tiles["entries"]:
        if entry["max_tokens"] == row["tokens"]:
            entry.update({f: row["triton_best"].get(f, False) for f in fields})
json.dump(tiles, open(path, "w"), indent=1)
open(path, "a").write("\n")
print(json.dumps(tiles["entries"]))
PY
    cp "$tiles" "$out/new_fp8_tiles.json"
    fp8_step moe-fp8-b64 64
else
    fp8_step moe-fp8-b64-a 64
    TAIL=1 step moe-bf16-b64 150 $py benchmarks/moe_speed.py --batch 64 --steps 40 --prefill 0 --json "$out/moe-bf16-b64.json"
    fp8_step moe-fp8-b64-b 64
    fp8_step moe-fp8-b1 1
fi
