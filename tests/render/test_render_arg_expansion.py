"""The kubelet expands a container's args before the process sees them: `$(VAR)` becomes the value of the
container's variable VAR (left as is when it has none) and `$$` becomes `$`. The config's text in the rendered
args (the proxy's chat template and tokenizer path, the engine_id base) must reach the processes as written, and
the pods' engine_ids must stay the ones the proxy expects."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import yaml

from tests.config.cli_helpers import invoke

TEMPLATE = "{% for m in messages %}$$ {{ m.content }} $(PDLAUNCH_API_KEY) $(POD_NAME) $x{% endfor %}"
ENGINE_ID = "base$$-$(POD_NAME)"


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of $(VAR) references (third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":  # an escaped `$`
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny", "chat_template": TEMPLATE},
                                      "proxy": {"routing_policy": "prefix"},
                                      "kv_transfer": {"engine_id": ENGINE_ID}}))
    out = tmp_path / "manifests"
    result = invoke(["render", "kubernetes", str(config), "--device", "cpu", "--api-key", "sk-test-key",
                     "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]


def container_env(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's variables as the kubelet resolves them (a secret's value stands for itself)."""
    env: dict[str, str] = {}
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[item["name"]] = f"<secret {source['secretKeyRef']['key']}>"
        else:
            env[item["name"]] = kubelet_expand(item["value"], env)
    return env


def test_the_configs_text_reaches_the_processes_as_written(tmp_path: Path) -> None:
    manifests = rendered(tmp_path)
    (proxy,) = (m["spec"]["template"]["spec"]["containers"][0] for m in manifests if m["kind"] == "Deployment")
    args = [kubelet_expand(a, container_env(proxy, {})) for a in proxy["args"]]
    assert args[args.index("--chat-template") + 1] == TEMPLATE
    expected = dict(a.split("=", 1) for a in args[1:] if a.startswith("decode-") or a.startswith("prefill-"))
    engine_ids = {k: v for k, v in expected.items() if not v.startswith("http")}

    for lws in (m for m in manifests if m["kind"] == "LeaderWorkerSet"):
        leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
        pod = f"{lws['metadata']['name']}-0"
        fields = {"status.podIP": "10.0.0.7", "metadata.name": pod, "metadata.uid": "uid-1"}
        env = container_env(leader, fields)
        spec = json.loads(kubelet_expand(leader["args"][leader["args"].index("--instance") + 1], env))
        assert spec["engine_id"] == f"{ENGINE_ID}-{pod}-uid-1"
        role = lws["metadata"]["labels"]["pdlaunch.io/role"]
        group = lws["metadata"]["name"].rsplit("-", 1)[1]
        assert fnmatch.fnmatchcase(spec["engine_id"], engine_ids[f"{role}-{group}-0"])
