"""What the serve flags and positionals say, as config overrides: the value of each config path, which
spelling the user typed for it (so a problem names that flag), and what the command line got wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pdlaunch.config.model_info import hub_id_hint
from pdlaunch.config.problems import Problem, problem

MODEL_NAMES = ("demo", "tiny")
POSITIONAL = "MODEL"  # how a problem names a model given as the positional argument


class Overrides(dict[str, object]):
    """Dotted config path -> value (a plain dict to every reader), plus `flags` (path -> the flag that
    set it) and `problems` found on the command line itself (refused spellings, conflicts). A value is
    what the flag or JSON gave, unchecked: pydantic checks it against the schema with the file's."""

    def __init__(self, values: Mapping[str, object] | None = None) -> None:
        super().__init__(values or {})
        self.flags: dict[str, str] = {}
        self.problems: list[Problem] = []

    def set(self, path: str, value: object, flag: str) -> None:
        """Set `path` from `flag`; the same path from two spellings must agree."""
        earlier = self.flags.get(path)
        if earlier is not None and earlier != flag and self[path] != value:
            self.problems.append(problem(flag, f"conflicts with {earlier} ({self[path]!r} against {value!r}): "
                                         "both set the same thing", f"give only one of {earlier} and {flag}"))
            return
        self[path] = value
        self.flags[path] = flag


def is_model(arg: str) -> bool:
    path = Path(arg)
    try:
        is_dir = path.is_dir()
    except OSError:  # a name too long for the file system (a config's text pasted as the argument): not a model
        is_dir = False
    return arg in MODEL_NAMES or is_dir or path.suffix.lower() == ".gguf"


def is_config(arg: str) -> bool:
    return Path(arg).suffix.lower() in (".yaml", ".yml")


_NEITHER_HINT = ("a model is a checkpoint directory that exists, a FILE.gguf, `demo` or `tiny`; a config file "
                 "ends in .yaml or .yml (pdlaunch reads local checkpoints only, no hub ids)")


def split_positionals(args: list[str], overrides: Overrides) -> Path | None:
    """`pdlaunch serve [MODEL] [CONFIG.yaml]`, in either order: the config file is returned, the model
    lands in `overrides` as `model.path`; anything else is a problem saying what it could have been."""
    config: Path | None = None
    for arg in args:
        if is_config(arg):
            if config is not None:
                overrides.problems.append(problem("CONFIG", f"two config files given ({config} and {arg})",
                                                  "give one deployment YAML"))
            config = Path(arg)
        elif is_model(arg):
            if "model.path" in overrides.flags and overrides["model.path"] != arg:
                overrides.problems.append(problem(POSITIONAL, f"{arg!r} is a second model (also "
                                                  f"{overrides.flags['model.path']} {overrides['model.path']!r})",
                                                  "give the model once: as the positional argument or --model"))
                continue
            overrides.set("model.path", arg, POSITIONAL)
        else:
            hint = hub_id_hint(arg) or _NEITHER_HINT
            if "model.served_model_name" in overrides.flags:  # vLLM's `--served-model-name A B` takes several
                hint += ("; a second served model name? --served-model-name takes one: list several in the YAML "
                         "file, `model: {served_model_name: [A, B]}`")
            overrides.problems.append(problem(POSITIONAL, f"{arg!r} is neither a model nor a config file", hint))
    return config
