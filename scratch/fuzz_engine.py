"""Throw-away fuzz: random requests, aborts, preemption, prefix cache (+ offload), integrity + no leaked block."""
import random, sys, tempfile
from pathlib import Path
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from tests.kv_transfer.deployment_secret import secured
from tests.helpers.checkpoints import make_qwen2_hybrid, make_llama

kind = sys.argv[1] if len(sys.argv) > 1 else "llama"
offload = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
d = Path(tempfile.mkdtemp())
ck = make_qwen2_hybrid(d / "h") if kind == "hybrid" else make_llama(d / "l")
ov = dict(block_size=4, num_gpu_blocks=48, max_num_seqs=6)
if offload:
    ov["kv_offload_gb"] = offload
eng = LLMEngine(secured(build_config(str(ck), "cpu", "float32", ov)))
rng = random.Random(seed)
bases = [[rng.randrange(3, 500) for _ in range(24)] for _ in range(4)]
live = set(); n = 0
for step in range(1500):
    if rng.random() < 0.3 and len(live) < 12:
        b = rng.choice(bases)
        prompt = b[:rng.randrange(1, 24)] + [rng.randrange(3, 500) for _ in range(rng.randrange(0, 10))]
        rid = f"r{n}"; n += 1
        p = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(100), ignore_eos=True)
        try:
            eng.add_request(rid, prompt, p); live.add(rid)
        except Exception as e:
            print("refused", e)
    if live and rng.random() < 0.05:
        rid = rng.choice(sorted(live)); eng.abort_request(rid); live.discard(rid)
    for o in eng.step():
        if o.finished: live.discard(o.request_id)
    eng.check_integrity()
while eng.has_unfinished_requests():
    eng.step()
eng.check_integrity()
print("used", eng.block_manager.num_used_blocks(), "preemptions", eng.scheduler.num_preemptions, "held", len(eng.scheduler.held))
assert eng.block_manager.num_used_blocks() == 0
eng.shutdown()
