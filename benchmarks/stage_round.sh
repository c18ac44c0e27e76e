#!/bin/bash
# A replayed step's inputs in one copy and one kernel (runner/stage_inputs.py), and its cos/sin in one kernel,
# against the tree before (OLD_TREE: an unpacked `git archive` of it), one GPU, one call: the GPU tests of the
# paths it touches, then the 8B-shape decode grid's 1 x 128 and 64 x 1024 cells, the trees alternated twice, the
# first round of each with the 1 x 128 step traced (its idle gaps between kernels).
# Usage: OLD_TREE=dir bash benchmarks/stage_round.sh OUT_DIR   (from the new tree; PYTHONPATH holds the packages)
source "$(dirname "$0")/steps.sh"
old=${OLD_TREE:?OLD_TREE}
TAIL=4 step gpu-tests 200 $py -m pytest -q -p no:cacheprovider -n 4 -m gpu tests/engine/test_stage_inputs.py \
    tests/engine/test_cuda_graphs.py tests/engine/test_async_scheduling.py tests/engine/test_seed_offset.py \
    tests/model/test_fused_ops.py
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 1 --context 128 --cells 64x1024 --steps 32)
for round in 1 2; do
    trace=(); [ "$round" = 1 ] && trace=(--step-trace 1x128)
    TAIL=6 step "grid-new-$round" 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" "${trace[@]}" \
        --json "$out/grid-new-$round.json"
    (cd "$old" && PYTHONPATH="$old:${PYTHONPATH:-}" TAIL=6 step "grid-old-$round" 120 $py benchmarks/decode_grid.py \
        /tmp/l8b "${cells[@]}" "${trace[@]}" --json "$out/grid-old-$round.json")
done
