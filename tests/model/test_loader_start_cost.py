"""What loading a checkpoint costs an instance's start besides the weights themselves."""

from __future__ import annotations

import subprocess
import sys

from pdlaunch.model.demo import resolve_model_path


def test_loading_a_checkpoint_imports_no_sympy() -> None:
    """Parameters built on the meta device are allocated on the target device without torch's Python reference
    of empty_like, which imports sympy (torch.fx's symbolic shapes): ~1.5 s of every CPU instance's start."""
    path = resolve_model_path("tiny")
    code = (
        "import sys, torch\n"
        "from pdlaunch.model.checkpoint import load_checkpoint\n"
        "from pdlaunch.model.loader import load_model\n"
        f"model = load_model(load_checkpoint({str(path)!r}), torch.device('cpu'), torch.float32)\n"
        "print(next(model.parameters()).device, 'sympy' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["cpu", "False"], result.stdout
