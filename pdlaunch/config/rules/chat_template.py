"""`model.chat_template` as each instance reads it at start (Tokenizer.override_chat_template): a file that
exists is read, anything else must be the template text itself, and the template must parse. Found here, a
wrong value is a check-config problem instead of every instance exiting once its weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdlaunch.config.problems import Problem, problem

FIELD = "model.chat_template"


def _kind(value: str) -> str | None:
    """"file", "directory", or None: nothing there (a long one-line template is no name the kernel takes)."""
    try:
        path = Path(value)
        return "file" if path.is_file() else "directory" if path.is_dir() else None
    except (OSError, ValueError):
        return None


def template_file(value: str | None) -> Path | None:
    """The file `model.chat_template` names, when it names one that exists here (else it is the template's text, or
    a path on another machine)."""
    return Path(value) if value is not None and _kind(value) == "file" else None


def chat_template_problems(value: str | None) -> list[Problem]:
    """Why the instances would refuse `value` as their chat template; [] when they take it (or it is unset)."""
    if value is None:
        return []
    template, kind = value, _kind(value)
    if kind == "file":
        try:
            template = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return [problem(FIELD, f"cannot read the chat template file {value!r}: {exc}",
                            "give a readable UTF-8 .jinja file")]
    elif "{{" not in value and "{%" not in value:
        what = "is a directory" if kind == "directory" else "is neither an existing file nor a Jinja2 template"
        return [problem(FIELD, f"{value!r} {what}",
                        "give the path of an existing .jinja file (relative to where serve runs), or the template "
                        "text itself")]
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        where = f" of {value!r}" if template is not value else ""
        return [problem(FIELD, f"the chat template{where} does not parse: {exc.message} (line {exc.lineno})",
                        "fix the Jinja2 syntax there")]
    return []
