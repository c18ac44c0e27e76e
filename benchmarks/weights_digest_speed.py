"""How long `weights_digest` (model/weights_digest.py; the storage connector's key) takes on a huge MoE's files.

Writes safetensors files with the tensor layout of a DeepSeek-V3-sized MoE (58 MoE layers x 256 experts x 3
projections of 7168 x 2048 fp8 weights, each with its float32 block scales, over 163 files) as sparse files: the
headers are real, the data are holes, so the files take a few MB on disk and every read comes from the page cache.
It then times the digest (warm: the second and later runs). A cold read from a network file system pays each
window's I/O on top (~712k reads of 256 bytes here).

    python benchmarks/weights_digest_speed.py [--dir /tmp/digest-moe] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

from pdlaunch.model.weights_digest import weights_digest

LAYERS, EXPERTS, FILES = 58, 256, 163
HIDDEN, INTER, BLOCK = 7168, 2048, 128


def write_checkpoint(directory: Path) -> int:
    """The sparse files; returns how many tensors they hold."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    names = [(f"model.layers.{layer}.mlp.experts.{e}.{p}", shape) for layer in range(3, 3 + LAYERS)
             for e in range(EXPERTS) for p, shape in shapes.items()]
    per_file = -(-len(names) // FILES)
    count = 0
    for index in range(0, len(names), per_file):
        header: dict[str, object] = {}
        offset = 0
        for name, (rows, cols) in names[index:index + per_file]:
            scales = (rows // BLOCK) * (cols // BLOCK) * 4
            header[f"{name}.weight"] = {"dtype": "F8_E4M3", "shape": [rows, cols],
                                        "data_offsets": [offset, offset + rows * cols]}
            header[f"{name}.weight_scale_inv"] = {"dtype": "F32", "shape": [rows // BLOCK, cols // BLOCK],
                                                  "data_offsets": [offset + rows * cols,
                                                                   offset + rows * cols + scales]}
            offset += rows * cols + scales
            count += 2
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with (directory / f"model-{index // per_file:05d}.safetensors").open("wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/digest-moe"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tensors = write_checkpoint(args.dir)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        digest = weights_digest(args.dir)
        times.append(time.perf_counter() - start)
    print(json.dumps({"tensors": tensors, "files": FILES, "digest": digest,
                      "seconds": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
