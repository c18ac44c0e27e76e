"""Repro: async scheduling preempts a PD prefill request whose last (only) token is still in flight; the token then
finishes it and the connector holds NO blocks for the decode (remote_block_ids empty): the decode's load fails."""
import sys
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.launcher.ports import PortAllocator
from tests.kv_transfer.deployment_secret import TEST_SECRET

trigger = int(sys.argv[1])
cfg = DeploymentConfig.model_validate({
    "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
    "model": {"path": "tiny", "max_model_len": 256}, "cache": {"num_gpu_blocks": 9, "block_size": 8},
    "scheduler": {"async_scheduling": True},
    "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 600.0},
    "security": {"deployment_secret": TEST_SECRET}})
P = LLMEngine(cfg, InstanceSpec(role="prefill", port=PortAllocator("127.0.0.1").free("p"), engine_id="P", device="cpu"))
assert P.async_scheduling
P.add_request("B", list(range(10, 18)), SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
B = P.scheduler.requests["B"]
added = False
final = {}
for _ in range(200):
    if not added and B.num_computed_tokens == trigger:
        P.add_request("A", list(range(100, 148)), SamplingParams(max_tokens=1, temperature=0.0),
                      {"do_remote_decode": True})
        added = True
    for o in P.step():
        if o.finished:
            final[o.request_id] = o
    if "A" in final:
        break
a = final.get("A")
print("trigger", trigger, "preemptions", P.scheduler.num_preemptions, "A finished:", a is not None and a.finish_reason,
      "remote_block_ids:", a and a.kv_transfer_params and a.kv_transfer_params.get("remote_block_ids"),
      "held:", sorted(P.scheduler.held))
P.shutdown()
