"""`--chat-template` / `model.chat_template` as its text: a file that exists is read (a regular file of at most
MAX_CHAT_TEMPLATE_BYTES, never a pipe or device), anything else must be the template text itself. check-config
(config/rules/chat_template.py) and each instance's tokenizer read it through `chat_template_text`, so the two
refuse the same values with the same words.
"""

from __future__ import annotations

from pathlib import Path

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.file_kind import special_file_kind

FIELD = "model.chat_template"
# Chat templates are a few KiB (the largest on the Hugging Face hub, with tool-calling instructions, tens of KiB).
# A template's literal text lands in every prompt (~4 bytes a token): a 57 MB file passed and then every chat
# request was refused as too long. And its text may travel as one command-line argument (the proxy's
# --chat-template, a Kubernetes container's args: render/kubernetes.py), which Linux refuses from 128 KiB on.
MAX_CHAT_TEMPLATE_BYTES = 96 << 10
def _path_kind(value: str) -> str | None:
    """"file", "directory", a special kind, or None: nothing there (a long one-line template is no name the kernel
    takes, and raises)."""
    try:
        path = Path(value)
        if path.is_file():
            return "file"
        return "directory" if path.is_dir() else special_file_kind(path)
    except (OSError, ValueError):
        return None


def template_file(value: str | None) -> Path | None:
    """The file `value` names, when it names a regular file that exists here (else it is the template's text, or a
    path on another machine)."""
    return Path(value) if value is not None and _path_kind(value) == "file" else None


def _read(value: str) -> str:
    size = Path(value).stat().st_size
    with open(value, "rb") as f:  # at most one byte past the cap: a file that grows while read is still bounded
        data = f.read(MAX_CHAT_TEMPLATE_BYTES + 1)
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        mib = max(size, len(data)) / (1 << 20)
        raise PdlaunchError(f"the chat template file {value!r} is {mib:.1f} MiB; a chat template is a few KiB and at "
                            f"most {MAX_CHAT_TEMPLATE_BYTES >> 10} KiB here (its text lands in every prompt)",
                            field=FIELD, hint="check that this is the .jinja file you meant")
    return data.decode("utf-8")


def chat_template_text(value: str) -> str:
    """The template `value` gives: the text of the file it names, else `value` itself when it reads as a Jinja2
    template. PdlaunchError (field model.chat_template) naming the value, what is wrong and what to give."""
    kind = _path_kind(value)
    if kind == "file":
        try:
            return _read(value)
        except (OSError, UnicodeDecodeError) as exc:
            raise PdlaunchError(f"cannot read the chat template file {value!r}: {exc}", field=FIELD,
                                hint="give a readable UTF-8 .jinja file") from None
    if kind not in (None, "directory"):
        raise PdlaunchError(f"{value!r} is {kind}, not a chat template file", field=FIELD,
                            hint="give the path of a regular .jinja file (write a pipe's output to a file first)")
    if "{{" not in value and "{%" not in value:
        what = "is a directory" if kind == "directory" else "is neither an existing file nor a Jinja2 template"
        raise PdlaunchError(f"{value!r} {what}", field=FIELD, hint="give the path of an existing .jinja file (relative "
                            "to where serve runs), or the template text itself")
    if len(value.encode()) > MAX_CHAT_TEMPLATE_BYTES:
        raise PdlaunchError(f"the chat template text given inline is {len(value.encode()) >> 10} KiB; a chat template "
                            f"is a few KiB and at most {MAX_CHAT_TEMPLATE_BYTES >> 10} KiB here (its text lands in "
                            "every prompt)", field=FIELD, hint="check that this is the template you meant")
    return value
