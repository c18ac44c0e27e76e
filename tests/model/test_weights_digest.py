"""The weights digest the storage connector keys its files by (model/weights_digest.py): the same weights give the
same digest wherever they lie; a change of any tensor a fine-tune trains, small or large, gives another; and a
storage decode whose weights differ finds none of the files another checkpoint's prefill stored. The e2e of two
deployments sharing a storage path is tests/kv_transfer/test_storage_two_checkpoints_e2e.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.model.weights_digest import WHOLE_BYTES, weights_digest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import make_spec


def _checkpoint(directory: Path, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"model.norm.weight": torch.ones(64),  # 256 bytes: hashed whole
            "model.layers.0.mlp.up_proj.weight": torch.randn(256, 256, generator=gen)}  # 256 KiB: sampled


def test_the_same_weights_elsewhere_give_the_same_digest(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path / "a", _weights())
    copy = shutil.copytree(first, tmp_path / "copy")
    assert weights_digest(first) == weights_digest(copy)


def test_the_digest_of_given_weights_does_not_change_between_releases(tmp_path: Path) -> None:
    """Files stored under one release's digest stay found by the next: how the digest is read may change (the windows'
    reads), what it is of may not."""
    assert weights_digest(_checkpoint(tmp_path / "a", _weights())) == "c3287ffc0d159a66"


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_a_trained_tensor_changes_the_digest(tmp_path: Path, tensor: str) -> None:
    base = _weights()
    tuned = {name: value.clone() for name, value in base.items()}
    tuned[tensor] += 1e-3 * torch.randn(tuned[tensor].shape, generator=torch.Generator().manual_seed(1))
    assert base["model.layers.0.mlp.up_proj.weight"].numel() * 4 > WHOLE_BYTES  # the large one is sampled
    assert weights_digest(_checkpoint(tmp_path / "base", base)) != weights_digest(_checkpoint(tmp_path / "t", tuned))


def test_an_unreadable_checkpoint_names_model_path(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(PdlaunchError) as err:
        weights_digest(tmp_path / "broken")
    assert err.value.field == "model.path"


def test_a_storage_decode_of_other_weights_finds_nothing_stored(tmp_path: Path) -> None:
    base = _checkpoint(tmp_path / "base", _weights())
    tuned = _checkpoint(tmp_path / "tuned", {**_weights(), "model.norm.weight": torch.full((64,), 1.01)})
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(connector="storage",
                                                                           storage_path=str(tmp_path / "kv"))))

    def connector(role: str, checkpoint: Path) -> KVConnector:
        made = create_connector(config, InstanceSpec(role=role, port=1, engine_id=f"{role}-{checkpoint.name}"))
        spec = make_spec(block_size=4)
        spec.checkpoint_path = checkpoint
        made.register_kv_caches(spec)
        return made

    prompt = list(range(20, 29))
    prefill = connector("prefill", base)
    _, params = prefill.request_finished("p", prompt, RemoteDecodeRequest(do_remote_decode=True), [[1, 2, 3]])
    assert connector("decode", base).get_num_new_matched_tokens("d", prompt, params, 0) == len(prompt) - 1
    assert connector("decode", tuned).get_num_new_matched_tokens("d", prompt, params, 0) == 0
