"""Values that used to pass check-config and then failed serve: log_dir, seeds, addresses, duplicate keys."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.ports import PortAllocator
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, check_json, invoke, write_yaml

CPU_ANY_PORT = ["--model", "tiny", "--device", "cpu"]
CPU = [*CPU_ANY_PORT, *FREE_PORT]


# --- log_dir ----------------------------------------------------------------------------------

def test_log_dir_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "logs"
    file.write_text("not a directory")
    path = write_yaml(tmp_path, f"log_dir: {file}\n")
    assert_invalid(check([str(path), *CPU]), "log_dir", "is a file, not a directory")
    served = invoke(["serve", str(path), *CPU])
    assert served.exit_code == 1 and "error: log_dir:" in served.output and "FileExistsError" not in served.output


def test_log_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert_invalid(check([*CPU, "--log-dir", str(tmp_path / "f" / "logs")]), "--log-dir", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_log_dir_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_invalid(check([*CPU, "--log-dir", str(locked / "logs")]), "--log-dir", "not writable")


def test_log_dir_that_does_not_exist_yet_is_fine(tmp_path: Path) -> None:
    assert check([*CPU, "--log-dir", str(tmp_path / "a" / "b")]).exit_code == 0


# --- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_outside_64_bits(seed: str, tmp_path: Path) -> None:
    assert_invalid(check([*CPU, "--seed", seed]), "--seed", "must be")
    assert_invalid(check([str(write_yaml(tmp_path, f"model: {{seed: {seed}}}\n")), *CPU]), "model.seed")


def test_largest_seed_is_valid() -> None:
    assert check([*CPU, "--seed", str(2**64 - 1)]).exit_code == 0


# --- addresses --------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "yaml_text"), [
    ("proxy.host", "proxy: {host: 'bad host!'}\n"),
    ("kv_transfer.side_channel_host", "kv_transfer: {side_channel_host: '-leading.dash'}\n"),
    ("parallel.master_addr", "parallel: {master_addr: '999.1.1.1'}\n"),
    ("parallel.nodes[1].address", "parallel: {nodes: [{address: a}, {address: 'x..y'}]}\n"),
    ("proxy.host", "proxy: {host: '[::1]'}\n"),
    ("proxy.host", "proxy: {host: ''}\n"),
])
def test_address_syntax(tmp_path: Path, key: str, yaml_text: str) -> None:
    result = check([str(write_yaml(tmp_path, yaml_text)), *CPU])
    assert_invalid(result, key)
    assert "in use" not in result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "localhost", "node-1.example.com", "my_service"])
def test_address_syntax_accepted(tmp_path: Path, host: str) -> None:
    path = write_yaml(tmp_path, f"parallel: {{master_addr: '{host}'}}\n")
    assert check([str(path), *CPU]).exit_code == 0


def test_host_that_is_not_this_machines(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a real interface.
    result = check([*CPU, "--host", "192.0.2.7"])
    assert_invalid(result, "--host", "not an address of this machine")
    assert "in use" not in result.output
    path = write_yaml(tmp_path, "kv_transfer: {side_channel_host: 192.0.2.7}\n")
    assert_invalid(check([str(path), *CPU]), "kv_transfer.side_channel_host", "not an address of this machine")


def test_host_that_does_not_resolve() -> None:
    assert_invalid(check([*CPU, "--host", "nosuchhost.invalid"]), "--host", "does not resolve")


def test_port_allocator_tells_a_bad_host_from_a_used_port() -> None:
    with pytest.raises(PdlaunchError, match="not an address of this machine"):
        PortAllocator("192.0.2.7").claim(8123, "proxy.port", "proxy")
    with pytest.raises(PdlaunchError, match="not an address of this machine"):
        PortAllocator("192.0.2.7").free("proxy")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        with pytest.raises(PdlaunchError, match="already in use") as err:
            PortAllocator("127.0.0.1").claim(port, "proxy.port", "proxy")
        assert err.value.field == "proxy.port"



def test_a_fixed_port_in_use_now_is_a_warning_naming_the_field(tmp_path: Path) -> None:
    """check-config said "valid" for a proxy port or base_port that something held, and serve stopped at
    it. Now it warns (the config is right; the port may be freed first) and names what the user typed."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = check([*CPU_ANY_PORT, "--port", str(port)])
        assert result.exit_code == 0, result.output
        assert f"warning: --port: port {port} (proxy) on 127.0.0.1: {port} in use now" in result.output
        path = write_yaml(tmp_path, "colocated: true\ninstances:\n"
                                    f"  - {{role: colocated, count: 2, base_port: {port - 1}}}\n")
        report = check_json([str(path), *CPU])
        assert report["valid"], report
        assert [w["field"] for w in report["warnings"] if "in use now" in w["message"]] == ["instances[0].base_port"]
        # another host's ports cannot be probed from here: no warning when checking for a target host
        assert "in use now" not in check([*CPU_ANY_PORT, "--port", str(port), "--target-gpus", "1",
                                          "--target-gpu-memory", "80"]).output
    assert "in use now" not in check([*CPU_ANY_PORT, "--port", str(port)]).output

# --- duplicate YAML keys ----------------------------------------------------------------------

def test_duplicate_keys_name_the_path_and_lines(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "proxy:\n  port: 8000\n  host: 127.0.0.1\n  port: 9000\n"
                                "instances:\n  - {role: prefill, count: 1, count: 2}\n  - {role: decode}\n")
    result = check([str(path), *CPU])
    assert_invalid(result, "proxy.port", "duplicate key `port`")
    assert "at line 4 (first at line 2)" in result.output
    assert_invalid(result, "instances[0].count", "duplicate key `count`")


def test_duplicate_top_level_section(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "cache: {block_size: 16}\nmodel: {path: tiny}\ncache: {block_size: 32}\n")
    assert_invalid(check([str(path), "--device", "cpu"]), "cache", "line 3 (first at line 1)")


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - &p {role: prefill, count: 1}\n  - {<<: *p, role: decode}\n")
    assert check([str(path), *CPU]).exit_code == 0


def test_another_hosts_log_dir_and_addresses_are_not_checked_here(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    path = write_yaml(tmp_path, f"log_dir: {tmp_path / 'f'}\nproxy: {{host: 192.0.2.7}}\n")
    target = ["--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]
    assert check([str(path), "--model", "tiny", *target]).exit_code == 0


# --- config.json flags ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias"])
def test_a_quoted_boolean_in_config_json_is_refused_as_the_loader_refuses_it(
        key: str, llama32_ckpt: Path, tmp_path: Path) -> None:
    """The model summary (config/model_info.py) read "false" as true (bool("false")), so the memory estimate
    of a checkpoint the loader refuses was computed for a tied model before the loader's own check said why."""
    model = tmp_path / "quoted"
    model.mkdir()
    for item in llama32_ckpt.iterdir():
        (model / item.name).symlink_to(item)
    (model / "config.json").unlink()
    hf = json.loads((llama32_ckpt / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, key: "false"}))
    info, problems = load_model_info(str(model))
    assert info is None and len(problems) == 1
    assert problems[0].message.startswith(f"{model / 'config.json'}: {key} 'false' is not true or false")
    result = check(["--model", str(model), "--device", "cpu"])
    assert_invalid(result, "--model", f"{key} 'false' is not true or false")
    assert "without quotes" in result.output and "memory estimate" not in result.output
