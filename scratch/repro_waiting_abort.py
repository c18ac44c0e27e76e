"""Repro: a PD decode request aborted while still WAITING in the decode's queue (before its KV load started) never
tells the prefill: the prefill keeps the request's blocks until the lease ends."""
import sys, time
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.launcher.ports import PortAllocator
from tests.kv_transfer.deployment_secret import TEST_SECRET

mode = sys.argv[1] if len(sys.argv) > 1 else "waiting"

def cfg(seqs):
    return DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": "tiny", "max_model_len": 256}, "cache": {"num_gpu_blocks": 64, "block_size": 8},
        "scheduler": {"max_num_seqs": seqs},
        "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 600.0},
        "security": {"deployment_secret": TEST_SECRET}})

ports = PortAllocator("127.0.0.1")
P = LLMEngine(cfg(8), InstanceSpec(role="prefill", port=ports.free("p"), engine_id="P", device="cpu"))
D = LLMEngine(cfg(1), InstanceSpec(role="decode", port=ports.free("d"), engine_id="D", device="cpu"))
prompt = list(range(10, 50))
P.add_request("p1", prompt, SamplingParams(max_tokens=1, temperature=0.0),
              {"do_remote_decode": True, "return_first_token": mode == "first_token"})
params = None
while P.has_unfinished_requests():
    for o in P.step():
        if o.finished:
            params = o.kv_transfer_params
print("prefill held:", sorted(P.scheduler.held), "used blocks", P.block_manager.num_used_blocks())
if mode == "waiting":
    D.add_request("blocker", list(range(60, 70)), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    D.step()
    D.add_request("d1", prompt, SamplingParams(max_tokens=5, temperature=0.0), params)
    for _ in range(3):
        D.step()
    print("decode d1 waiting:", [r.request_id for r in D.scheduler.waiting], "loading:", list(D.scheduler.waiting_for_kv))
    D.abort_request("d1")
elif mode == "control":  # the same abort once the load started: the prefill is told
    D.add_request("d1", prompt, SamplingParams(max_tokens=5, temperature=0.0), params)
    D.step()
    print("decode d1 loading:", list(D.scheduler.waiting_for_kv))
    D.abort_request("d1")
else:  # the decode's own stop rule ends it on the prefill's first token (a client's stop id, the context's room)
    first = params["first_token_ids"][0]
    D.add_request("d1", prompt, SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[first]), params)
    for o in D.step():
        print("decode out", o.request_id, o.finished, o.finish_reason)
deadline = time.monotonic() + 5
while time.monotonic() < deadline and P.scheduler.held:
    P.step(); D.step(); time.sleep(0.01)
print("after 5 s: prefill held:", sorted(P.scheduler.held), "used blocks", P.block_manager.num_used_blocks())
D.shutdown(); P.shutdown()
