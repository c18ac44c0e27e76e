"""What a running deployment's engines did while one command ran: utilisation, prefill tokens/s and the prefill
FLOP rate against a matmul ceiling (the figures `bench compare` gives per rate, for a deployment started by hand,
e.g. one colocated instance on one GPU).

    python -m pdlaunch.bench.matmul_ceiling --device cuda > ceiling.json      # before the deployment starts
    python benchmarks/step_load.py --base-url http://127.0.0.1:8000 --model CKPT --input-len 3072 \\
        --ceiling ceiling.json --json load.json -- python -m pdlaunch bench serve ...

The instances are those the proxy lists at /instances; the step counters are read before and after the command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx

from pdlaunch.bench.engine_load import LoadProbe
from pdlaunch.bench.matmul_ceiling import MatmulCeiling, Yardstick
from pdlaunch.config.model_info import load_model_info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the proxy")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint (for FLOPs per prompt token)")
    parser.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    parser.add_argument("--ceiling", type=Path, help="matmul_ceiling's JSON line, measured before the deployment")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command that loads the deployment")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the load command after --")
    info, problems = load_model_info(str(args.model))
    if info is None:
        parser.error(f"--model {args.model}: {problems[0].message if problems else 'no config.json'}")
    listed = httpx.get(f"{args.base_url}/instances", timeout=10.0, trust_env=False).json()
    probe = LoadProbe([(i["role"], i["url"]) for i in listed], headers={})
    probe.start()
    done = subprocess.run(command, check=False)
    load = probe.stop()
    probe.close()
    ceiling = None
    if args.ceiling is not None:
        ceiling = MatmulCeiling.model_validate_json(args.ceiling.read_text().strip().splitlines()[-1])
    yardstick = Yardstick(input_len=args.input_len, flops_per_token=info.prefill_flops(args.input_len)
                          / args.input_len, ceiling=ceiling)
    share = yardstick.share(load.prefill_tokens_per_s)
    result = {"load": load.model_dump(), "yardstick": yardstick.model_dump(),
              "prefill": share.model_dump() if share else None, "command_exit": done.returncode}
    line = (f"prefill util {load.prefill_util:.1%}, decode util {load.decode_util:.1%}, "
            f"decode step {load.decode_step_ms or 0:.2f} ms at batch {load.decode_batch or 0:.1f}")
    if share is not None:
        line += f"; prefill steps {load.prefill_tokens_per_s:.0f} tok/s = {share.tflops:.0f} TFLOP/s"
        if ceiling is not None and share.of_matmul is not None:
            line += f" = {share.of_matmul:.1%} of {ceiling.tflops:.0f} ({ceiling.device})"
    print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
