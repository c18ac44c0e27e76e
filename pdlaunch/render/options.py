"""The options of `pdlaunch render kubernetes` (--image, --name, --namespace, --gpus-per-node; the model volume's in
render/model_volume.py, the CPU pods' memory in render/pod_resources.py), and what Kubernetes would refuse in them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pdlaunch.render.model_volume import ModelVolume

NAME_MAX = 40  # `NAME-colocated-G`, a LeaderWorkerSet's (so its StatefulSets') name, must stay within 52
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # DNS-1035 label (Service names), also a label value
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # DNS-1123 label
# An image reference as the kubelet parses it (distribution/reference): [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST].
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?P<name>(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*)(?::[\w][\w.-]{{0,127}})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?", re.ASCII)


def option_problems(image: str, name: str, namespace: str | None) -> list[tuple[str, str]]:
    """What Kubernetes would refuse in the flags of `pdlaunch render kubernetes`: (flag, message with the fix)."""
    problems: list[tuple[str, str]] = []
    if not _NAME.fullmatch(name) or len(name) > NAME_MAX:
        problems.append(("--name", f"{name!r} cannot prefix the objects' names (and be their label value): use "
                         f"lowercase letters, digits and '-', starting with a letter and ending with a letter or "
                         f"digit, at most {NAME_MAX} characters (got {len(name)}), e.g. --name pd-llama"))
    if namespace is not None and (not _NAMESPACE.fullmatch(namespace) or len(namespace) > 63):
        problems.append(("--namespace", f"{namespace!r} is not a Kubernetes namespace: use lowercase letters, "
                         "digits and '-', starting and ending with a letter or digit, at most 63 characters; "
                         "leave --namespace out for kubectl's current namespace"))
    found = _IMAGE.fullmatch(image)
    if found is None or len(found.group("name")) > 255:
        problems.append(("--image", f"{image!r} is not a container image reference: write "
                         "[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], the repository in lowercase, "
                         "e.g. --image registry.example.com/team/pdlaunch:1.0"))
    return problems


@dataclass(frozen=True)
class RenderOptions:
    image: str  # a container image with pdlaunch (and the checkpoint, unless model_volume holds it)
    name: str = "pdlaunch"  # prefix of every object's name
    namespace: str | None = None
    gpus_per_node: int = 8  # a TP group larger than this is spread one rank per pod
    model_volume: ModelVolume | None = None  # mounted read-only in every pod that reads the checkpoint
    cpu_pod_memory: str | None = None  # a CPU engine pod's memory request (a Kubernetes quantity); None: the estimate
    cpu_pod_memory_limit: str | None = None  # a CPU engine pod's memory limit; None: no limit
