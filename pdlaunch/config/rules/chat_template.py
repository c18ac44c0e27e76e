"""`model.chat_template` as each instance reads it at start (Tokenizer.override_chat_template, through
model/chat_template_file.py): a regular file that exists is read (up to a cap), anything else must be the template
text itself, and the template must parse. Found here, a wrong value is a check-config problem instead of every
instance exiting once its weights are loaded.
"""

from __future__ import annotations

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.chat_template_file import FIELD, chat_template_text, template_file

__all__ = ["chat_template_problems", "template_file"]


def chat_template_problems(value: str | None) -> list[Problem]:
    """Why the instances would refuse `value` as their chat template; [] when they take it (or it is unset)."""
    if value is None:
        return []
    try:
        template = chat_template_text(value)
    except PdlaunchError as exc:
        return [problem(FIELD, exc.message, exc.hint or "give a .jinja file or the template text")]
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        where = f" of {value!r}" if template is not value else ""
        return [problem(FIELD, f"the chat template{where} does not parse: {exc.message} (line {exc.lineno})",
                        "fix the Jinja2 syntax there")]
    return []
