"""Values check-config passed (or named wrongly) that no deployment can serve with, as a user types them.

- A 57 MB --chat-template file passed; then every chat request was refused as too long. A FIFO or a device as the
  template read "is neither an existing file nor a Jinja2 template". Now: a file past the cap is refused naming its
  size and the cap, and a pipe or device is named as what it is (without opening it: a FIFO would wait for a writer).
- --max-model-len 1 passed, though the engine takes no request under 2 tokens (a prompt of at least one token and
  max_tokens of at least one). Now refused, saying the smallest that can serve.
- A FIFO named x.gguf or x.yaml as --model read "is a file, not a directory" (or "does not exist"). Now named as a
  named pipe, saying what to pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.chat_template_file import MAX_CHAT_TEMPLATE_BYTES
from pdlaunch.model.tokenizer import Tokenizer
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, invoke, write_model, write_yaml

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # a loaded 2-core machine: the CLI's imports alone take seconds
CPU = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
GOOD = "{% for m in messages %}{{ m.content }}{% endfor %}"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as its own process, so that a read that blocks (a FIFO) ends the test by its timeout, not hangs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pdlaunch", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def _big_template(path: Path) -> Path:
    with path.open("w") as f:
        f.write(GOOD)
        f.write("{# " + "x" * (1 << 20) + " #}")  # 1 MiB
    return path


def test_a_chat_template_file_past_the_cap_is_refused(tmp_path: Path) -> None:
    big = _big_template(tmp_path / "big.jinja")
    text = f"the chat template file {str(big)!r} is 1.0 MiB; a chat template is a few KiB and at most 96 KiB here"
    assert_invalid(check([*CPU, "--chat-template", str(big)]), "--chat-template", text)
    config = write_yaml(tmp_path, f"model:\n  path: tiny\n  chat_template: {str(big)!r}\n")
    assert_invalid(check([str(config), "--device", "cpu", *FREE_PORT]), "model.chat_template", text)


def test_an_inline_template_past_the_cap_is_refused(tmp_path: Path) -> None:
    # Inline, its text would be one argument of the proxy's command line (--chat-template): Linux refuses one of
    # 128 KiB or more, so the proxy could not start.
    inline = GOOD + "{# " + "x" * (MAX_CHAT_TEMPLATE_BYTES + 1) + " #}"
    config = write_yaml(tmp_path, f"model:\n  path: tiny\n  chat_template: {inline!r}\n")
    assert_invalid(check([str(config), "--device", "cpu", *FREE_PORT]), "model.chat_template",
                   "the chat template text given inline is 96 KiB; a chat template is a few KiB and at most 96 KiB")


def test_serve_refuses_a_template_past_the_cap_before_starting_anything(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    served = invoke(["serve", *CPU, "--colocated", "--chat-template", str(_big_template(tmp_path / "big.jinja")),
                     "--log-dir", str(logs)])
    assert served.exit_code == 1, served.output
    assert "error: --chat-template:" in served.output and "at most 96 KiB" in served.output, served.output
    assert not logs.exists()  # no instance was started


def test_a_template_of_a_real_size_still_passes(tmp_path: Path) -> None:
    real = tmp_path / "real.jinja"
    real.write_text(GOOD + "{# " + "a tool-calling preamble " * 2000 + "#}")  # ~48 KiB, larger than real ones
    result = check([*CPU, "--chat-template", str(real)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_fifo_as_the_chat_template_is_named_as_one(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "chat.jinja"
    os.mkfifo(fifo)
    done = run_cli(command, *CPU, "--colocated", "--chat-template", str(fifo), "--log-dir", str(tmp_path / "logs"))
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert f"error: --chat-template: {str(fifo)!r} is a named pipe (FIFO), not a chat template file" in output, output
    assert "give the path of a regular .jinja file" in output, output


def test_a_device_as_the_chat_template_is_named_as_one() -> None:
    result = check([*CPU, "--chat-template", "/dev/zero"])
    assert_invalid(result, "--chat-template", "'/dev/zero' is a character device, not a chat template file")


def test_the_instance_tokenizer_refuses_the_same(tmp_path: Path) -> None:
    tokenizer = Tokenizer(write_model(tmp_path))
    fifo = tmp_path / "pipe.jinja"
    os.mkfifo(fifo)
    for value, says in [(str(_big_template(tmp_path / "big.jinja")), "at most 96 KiB"),
                        (str(fifo), "is a named pipe (FIFO)"), ("/dev/zero", "is a character device")]:
        with pytest.raises(PdlaunchError) as caught:
            tokenizer.override_chat_template(value)
        assert caught.value.field == "model.chat_template" and says in caught.value.message, caught.value.render()


@pytest.mark.parametrize("length", ["1"])
def test_a_max_model_len_no_request_fits_is_refused(tmp_path: Path, length: str) -> None:
    says = "1 leaves no room for a request: one needs a prompt of at least 1 token and max_tokens of at least 1"
    result = check([*CPU, "--max-model-len", length])
    assert_invalid(result, "--max-model-len", says)
    assert "the smallest that can serve is 2" in result.output, result.output
    config = write_yaml(tmp_path, f"model:\n  path: tiny\n  max_model_len: {length}\n")
    assert_invalid(check([str(config), "--device", "cpu", *FREE_PORT]), "model.max_model_len", says)


@pytest.mark.parametrize(("length", "says"), [("0", "0 leaves no room"), ("-3", "-3 leaves no room")])
def test_zero_and_negative_lengths_say_the_smallest_too(length: str, says: str) -> None:
    result = check([*CPU, "--max-model-len", length])
    assert_invalid(result, "--max-model-len", says)
    assert "the smallest that can serve is 2" in result.output, result.output


def test_the_smallest_max_model_len_passes() -> None:
    result = check([*CPU, "--max-model-len", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["x.gguf", "x.yaml", "model"])
def test_a_fifo_as_the_model_is_named_as_one(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    done = run_cli("check-config", "--model", str(fifo), "--device", "cpu", *FREE_PORT)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert (f"error: --model: {str(fifo)!r} is a named pipe (FIFO), not a checkpoint directory or .gguf file"
            in output), output
    assert "give a local HF checkpoint directory" in output, output
