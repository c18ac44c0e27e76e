"""The manifests' strings stay strings for kubectl, whose YAML reader (go-yaml v2 through sigs.k8s.io/yaml) resolves
more plain scalars than PyYAML's: `y`/`n` are booleans there, `1e3` and `08` floats, `0o17` an int, `2024-1-5` a
timestamp. Such a string written plain (a --namespace, a --name, an API key, the secret digest annotation) made
`kubectl apply` fail on a bool or number where the API takes a string."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import yaml

from pdlaunch.render.manifest_files import write_manifests
from tests.render.test_render_bad_inputs import render

_GO_WORDS = {"y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE", "n", "N", "no", "No", "NO",
             "off", "Off", "OFF", "false", "False", "FALSE", "", "~", "null", "Null", "NULL", "<<",
             ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF"}
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_GO_INT = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO]?[0-7]+|0[bB][01]+|[0-9]+)")
_GO_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?")


def go_yaml_reads_a_string(plain: str) -> bool:
    """Whether go-yaml v2 (resolve.go) takes the plain scalar `plain` as a string."""
    if plain in _GO_WORDS:
        return False
    if plain[:1] in set("+-.0123456789"):
        if _GO_TIMESTAMP.fullmatch(plain):
            return False
        bare = plain.replace("_", "")
        return not (_GO_INT.fullmatch(bare) or _GO_FLOAT.fullmatch(bare))
    return True


def plain_strings(node: yaml.Node) -> list[str]:
    """The strings (as PyYAML reads them) written as plain scalars under `node`."""
    if isinstance(node, yaml.ScalarNode):
        return [node.value] if node.style is None and node.tag == "tag:yaml.org,2002:str" else []
    if isinstance(node, yaml.SequenceNode):
        return [s for item in node.value for s in plain_strings(item)]
    if isinstance(node, yaml.MappingNode):
        return [s for key, value in node.value for s in plain_strings(key) + plain_strings(value)]
    return []


def misread(path: Path) -> list[str]:
    node = yaml.compose(path.read_text())
    assert node is not None
    return [s for s in plain_strings(node) if not go_yaml_reads_a_string(s)]


def test_the_go_yaml_model_reads_what_kubectl_reads() -> None:
    assert not go_yaml_reads_a_string("y") and not go_yaml_reads_a_string("1e3")
    assert not go_yaml_reads_a_string("08") and not go_yaml_reads_a_string("0o17")
    assert go_yaml_reads_a_string("pdlaunch") and go_yaml_reads_a_string("0.0.0.0") and go_yaml_reads_a_string("-c")


@pytest.mark.parametrize(("name", "namespace", "key"), [("n", "1e3", "1234567890e123456"), ("y", "08", "0o1234567"),
                                                        ("pd", "2024-1-5", "-12e5")])
def test_rendered_strings_are_strings_for_kubectl(tmp_path: Path, name: str, namespace: str, key: str) -> None:
    result = render(tmp_path / "out", "--name", name, "--namespace", namespace, "--api-key", key)
    assert result.exit_code == 0, result.output
    paths = sorted((tmp_path / "out").glob("*.yaml"))
    assert paths and {p: misread(p) for p in paths} == {p: [] for p in paths}
    secret = yaml.safe_load(paths[0].read_text())
    assert secret["kind"] == "Secret" and secret["stringData"]["api-key"] == key
    assert secret["metadata"] == {"name": f"{name}-deployment", "namespace": namespace,
                                  "labels": {"app.kubernetes.io/name": "pdlaunch", "app.kubernetes.io/instance": name}}


def test_a_secret_digest_that_looks_like_a_number_stays_a_string(tmp_path: Path) -> None:
    # 1 render in about 1300 draws a secret whose digest is digits around one `e`
    for digest in ("1234567e89012345", "0812345678901234", "1e00000000000000"):
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pd-proxy", "labels": {}},
                   "spec": {"selector": {"pdlaunch.io/secret-digest": digest}, "ports": []}}
        [path] = write_manifests([service], tmp_path / digest)  # type: ignore[list-item]
        assert misread(path) == []
        assert yaml.safe_load(path.read_text()) == service


def test_a_render_over_a_readable_secret_file_makes_it_the_owners_only(tmp_path: Path) -> None:
    # a re-render into the same --out rewrote the Secret's file (the deployment secret, the API key) keeping its mode:
    # one copied or written world-readable stayed so
    out = tmp_path / "out"
    assert render(out, "--api-key", "k" * 20).exit_code == 0
    secret = out / "00-secret-pdlaunch-deployment.yaml"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    secret.chmod(0o644)
    assert render(out, "--api-key", "k" * 20).exit_code == 0
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o600 for p in out.iterdir()}
