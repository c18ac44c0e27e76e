source benchmarks/steps.sh $OUT/r3
TAIL=14 step moe-kernels-fp8 300 $py benchmarks/moe_kernels.py --fp8 --write-config --tokens 1 16 64 256 4096 --json "$out/moe-kernels-fp8.json"
cp pdlaunch/model/moe/configs/NVIDIA_H200_fp8.json "$out/"
TAIL=3 step moe-fp8 170 $py benchmarks/moe_speed.py --batch 1 16 64 --prefill 1024 --fp8-experts --fp8-attention --json $out/moe-fp8.json
TAIL=30 step profile 100 $py benchmarks/moe_profile.py --tokens 64
