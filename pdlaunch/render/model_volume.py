"""The model volume of `pdlaunch render kubernetes` (--model-volume, --model-mount-path): the checkpoint mounted
read-only into every pod that reads it.

The pods read the deployment as written, so model.path is the checkpoint's path inside the pod. The volume is
mounted at the directory that holds it (a checkpoint directory `/models/llama-3-8b` or a file `/models/m.gguf`
mounts at `/models`: a claim holding several models under its root serves any of them), or at --model-mount-path.
Two sources:

- `pvc:CLAIM`, a PersistentVolumeClaim in the objects' namespace: the way that works on any cluster. Pods on
  several nodes need a claim they can all mount (ReadOnlyMany or ReadWriteMany); a ReadWriteOnce claim serves the
  pods of one node only.
- `hostpath:/DIR`, a directory of the node: for a single-node lab (kind, minikube, k3s) whose weights are already
  on the node's disk. Its type is Directory, so a node without it fails the pod at once (FailedMount) instead of
  the kubelet creating an empty directory and the engine failing later on a missing config.json.

The engine pods (every role, every TP rank's pod) always read the checkpoint; the proxy only when it tokenizes
(prefix routing or disaggregate_min_tokens: proxy_policy_args' --tokenizer), and only then does it mount it, so a
proxy that needs no model does not hold the claim.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal

from pdlaunch.config.problems import Problem, problem
from pdlaunch.render.core_api import Volume, VolumeMount

VOLUME_NAME = "model"  # beside the pods' `deployment` and `dshm` volumes
FLAG = "--model-volume"
MOUNT_FLAG = "--model-mount-path"
# A claim's name is a DNS-1123 subdomain, as the API server checks it.
_CLAIM = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_FORMS = "pvc:CLAIM (a PersistentVolumeClaim) or hostpath:/DIR (a directory of the node)"
BUILT_IN_MODELS = ("demo", "tiny")  # not read from any path


@dataclass(frozen=True)
class ModelVolume:
    kind: Literal["pvc", "hostpath"]
    source: str  # the claim's name, or the node's directory
    mount_path: str  # where the pods see it; model.path is there or under it

    def volume(self) -> Volume:
        if self.kind == "pvc":
            return {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": self.source, "readOnly": True}}
        return {"name": VOLUME_NAME, "hostPath": {"path": self.source, "type": "Directory"}}

    def mount(self) -> VolumeMount:
        return {"name": VOLUME_NAME, "mountPath": self.mount_path, "readOnly": True}


def _clean(path: str) -> str:
    """An absolute POSIX path without `.`, `..`, doubled or trailing slashes, as the pod sees it."""
    return posixpath.normpath(path).replace("//", "/", 1)  # normpath keeps a leading `//`


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def volume_flag_problems(value: str | None, mount_path: str | None) -> list[tuple[str, str]]:
    """What is malformed in --model-volume and --model-mount-path themselves: (flag, message with the fix)."""
    found: list[tuple[str, str]] = []
    if value is None:
        if mount_path is not None:
            found.append((MOUNT_FLAG, f"{mount_path!r} is given without {FLAG}: nothing would be mounted there; "
                          f"add {FLAG} {_FORMS}, or leave {MOUNT_FLAG} out"))
        return found
    kind, colon, source = value.partition(":")
    if not colon or kind not in ("pvc", "hostpath"):
        found.append((FLAG, f"{value!r} names no volume: write {_FORMS}, e.g. {FLAG} pvc:llama-weights"))
    elif kind == "pvc" and (not _CLAIM.fullmatch(source) or len(source) > 253):
        found.append((FLAG, f"{source!r} is not a PersistentVolumeClaim name: use lowercase letters, digits, '-' "
                      "and '.', starting and ending with a letter or digit, at most 253 characters, e.g. "
                      f"{FLAG} pvc:llama-weights"))
    elif kind == "hostpath" and (not source.startswith("/") or ".." in source.split("/") or _clean(source) == "/"):
        found.append((FLAG, f"{source!r} is not a directory of the node Kubernetes mounts: give an absolute path "
                      f"without '..', not / itself, e.g. {FLAG} hostpath:/data/models"))
    if mount_path is not None and (not mount_path.startswith("/") or _clean(mount_path) == "/"):
        found.append((MOUNT_FLAG, f"{mount_path!r} is not a directory to mount the model at: give an absolute "
                      "path in the pod other than /, e.g. --model-mount-path /models"))
    return found


def model_volume(value: str, mount_path: str | None, model_path: str,
                 pod_mounts: tuple[str, ...]) -> tuple[ModelVolume | None, list[Problem]]:
    """The volume of a well-formed --model-volume (volume_flag_problems found nothing) for the model at
    `model_path` in the pod, or why the pods would not find the model on it; `pod_mounts`: the pods' other
    mount paths, which it must stay clear of."""
    kind, _, source = value.partition(":")
    fix = (f"give model.path as the checkpoint's absolute path inside the pod, on the volume (e.g. --model "
           f"/models/llama-3-8b with {MOUNT_FLAG} /models)")
    if model_path in BUILT_IN_MODELS:
        return None, [problem("model.path", f"{model_path!r} is built into pdlaunch and read from no volume, "
                              f"so {FLAG} would mount nothing the pods read", f"leave {FLAG} out, or {fix}")]
    if not model_path.startswith("/"):
        return None, [problem("model.path", f"{model_path!r} is relative (or starts with ~), so the pods would "
                              f"look for it in the image, not on the volume of {FLAG}", fix)]
    model = _clean(model_path)
    mount = _clean(mount_path) if mount_path is not None else posixpath.dirname(model)
    if mount_path is None and mount == "/":
        return None, [problem("model.path", f"{model_path!r} is directly under /, and {FLAG} cannot be mounted "
                              "over the pod's root", f"give {MOUNT_FLAG} {model} to mount the volume at the "
                              "checkpoint itself, or move the checkpoint into a directory")]
    if not _under(model, mount):
        return None, [problem("model.path", f"{model_path!r} is not under {MOUNT_FLAG} {mount}, where the volume "
                              "is mounted: the pods would not find the model on it",
                              f"give the model's path under {mount} (e.g. {mount}/{posixpath.basename(model)}), "
                              f"or a {MOUNT_FLAG} that holds it")]
    clash = next((other for other in pod_mounts if _under(other, mount) or _under(mount, other)), None)
    if clash is not None:
        field = MOUNT_FLAG if mount_path is not None else "model.path"
        return None, [problem(field, f"the model volume's mount path {mount} overlaps the pods' {clash}, which "
                              "pdlaunch mounts itself", f"keep the checkpoint elsewhere, e.g. under /models, with "
                              f"{MOUNT_FLAG} outside {clash}")]
    if kind == "pvc":
        return ModelVolume("pvc", source, mount), []
    return ModelVolume("hostpath", _clean(source), mount), []
