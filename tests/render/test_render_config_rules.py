"""`pdlaunch render kubernetes` writes the deployment its pods run: settled as `pdlaunch serve` settles it (sleep mode
turns the cumem allocator on), and refused, as check-config refuses it, where a rule holds on any host (the pods start
`python -m pdlaunch.server` on the deployment as written, and no check runs there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import Result

from tests.config.cli_helpers import invoke, write_yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def render(out: Path, *args: str) -> Result:
    return invoke(["render", "kubernetes", *args, "--out", str(out), "--image", "pdlaunch:test"])


def deployment(out: Path) -> dict[str, object]:
    """The deployment the pods read, from the rendered Secret."""
    secret = yaml.safe_load((out / "00-secret-pdlaunch-deployment.yaml").read_text())
    found: dict[str, object] = json.loads(secret["stringData"]["deployment.json"])
    return found


def test_sleep_mode_turns_the_cumem_allocator_on_in_the_pods_deployment(tmp_path: Path) -> None:
    # Without it the pods would keep weights and KV outside the CuMem pools, and a sleep could neither give the
    # memory back at the same addresses nor keep NIXL's registrations valid.
    out = tmp_path / "out"
    result = render(out, str(EXAMPLES / "sleep-mode.yaml"))
    assert result.exit_code == 0, result.output
    model = deployment(out)["model"]
    assert isinstance(model, dict)
    assert model["enable_sleep_mode"] is True and model["enable_cumem_allocator"] is True


def test_a_rendered_deployment_without_sleep_mode_keeps_cumem_off(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert render(out, "--model", "tiny").exit_code == 0
    model = deployment(out)["model"]
    assert isinstance(model, dict) and model["enable_cumem_allocator"] is False


@pytest.mark.parametrize(("args", "flag", "text"), [
    (["--enable-sleep-mode"], "--enable-sleep-mode", "it needs CUDA (device is cpu)"),
    (["--enable-cumem-allocator"], "--enable-cumem-allocator", "it needs CUDA (device is cpu)"),
    (["--block-size", "7"], "--block-size", "7 is not a supported block size"),
    (["--dtype", "float16"], "--dtype", "float16 is not supported on CPU"),
    (["--num-gpu-blocks", "4", "--max-model-len", "1024"], "--num-gpu-blocks", "cannot hold one 1024-token sequence"),
])
def test_what_check_config_refuses_on_any_host_is_refused_before_writing(tmp_path: Path, args: list[str], flag: str,
                                                                         text: str) -> None:
    out = tmp_path / "out"
    result = render(out, "--model", "tiny", "--device", "cpu", *args)
    assert result.exit_code == 1, result.output
    assert any(line.startswith(f"error: {flag}:") and text in line for line in result.output.splitlines()), \
        result.output
    assert not out.exists()


def test_a_stall_deadline_past_the_request_deadline_is_refused_by_its_key(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "proxy: {request_timeout_seconds: 10, health_timeout_seconds: 30}\n")
    out = tmp_path / "out"
    result = render(out, str(config), "--model", "tiny")
    assert result.exit_code == 1, result.output
    assert "error: proxy.health_timeout_seconds: 30s is not below proxy.request_timeout_seconds" in result.output
    assert not out.exists()


@pytest.mark.parametrize(("args", "field"), [([""], "MODEL"), (["--model", ""], "--model"),
                                             (["--model", " "], "--model"), (["{yaml}"], "model.path")])
def test_an_empty_model_is_refused_not_rendered(tmp_path: Path, args: list[str], field: str) -> None:
    """`render kubernetes "$CONFIG"` or `--model "$MODEL"` with the variable unset: the manifests named no model,
    and every pod would have failed to load one."""
    config = write_yaml(tmp_path, "model: {path: ''}\n")
    out = tmp_path / "out"
    result = render(out, *[arg.format(yaml=config) for arg in args])
    assert result.exit_code == 1, result.output
    assert f"error: {field}: " in result.output and "names no model" in result.output, result.output
    assert not out.exists()


def test_a_local_chat_template_file_reaches_the_pods_as_its_text(tmp_path: Path) -> None:
    """A pod has no file of the machine that rendered it: a --chat-template naming a local file is written into the
    pods' deployment as the template's text; a path that is no local file (one inside the image) stays a path."""
    template = tmp_path / "chat.jinja"
    text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    template.write_text(text)
    out = tmp_path / "out"
    result = render(out, "--model", "tiny", "--device", "cpu", "--chat-template", str(template))
    assert result.exit_code == 0, result.output
    model = deployment(out)["model"]
    assert isinstance(model, dict) and model["chat_template"] == text
    assert str(template) in result.output  # said, so the user knows the pods carry a copy

    inline = tmp_path / "inline"
    result = render(inline, "--model", "tiny", "--device", "cpu", "--chat-template", "{{ messages[0]['content'] }}")
    assert result.exit_code == 0, result.output
    model = deployment(inline)["model"]
    assert isinstance(model, dict) and model["chat_template"] == "{{ messages[0]['content'] }}"


def test_a_local_chat_template_file_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}")
    result = render(tmp_path / "out", "--model", "tiny", "--device", "cpu", "--chat-template", str(template))
    assert result.exit_code == 1 and "--chat-template" in result.output and "does not parse" in result.output
    assert "Traceback" not in result.output


def test_the_proxy_pod_gets_the_template_text_the_instances_get(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    template.write_text(text)
    out = tmp_path / "out"
    result = render(out, "--model", "tiny", "--device", "cpu", "--routing-policy", "prefix", "--chat-template",
                    str(template))
    assert result.exit_code == 0, result.output
    proxy = next(yaml.safe_load(p.read_text()) for p in out.glob("*.yaml") if "proxy" in p.name
                 and yaml.safe_load(p.read_text())["kind"] == "Deployment")
    args = proxy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--chat-template") + 1] == text
