"""Problems name what the user typed: a value set by a flag is reported as that flag (`--prefill`), and the
paths its message mentions that flags set as those flags (flag_terms.py); a value from the YAML file by its key
path (`instances[0].count`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pdlaunch.config.cli_overrides import Overrides
from pdlaunch.config.flag_terms import in_flag_terms
from pdlaunch.config.flags import SERVE_FLAGS
from pdlaunch.config.problems import Problem

# The canonical flag of each path (`--tp`, not `--tensor-parallel-size`): what a problem names when the
# overrides do not say which spelling set the value.
FLAG_FOR_PATH: dict[str, str] = {}
for _flag in SERVE_FLAGS:
    if _flag.refused is None:
        FLAG_FOR_PATH.setdefault(_flag.path, _flag.option)
ROLE_PATH = re.compile(r"^instances\[(prefill|decode|colocated)\]\.(\w+)$")


def _role(group: object) -> object:
    return group.get("role") if isinstance(group, dict) else getattr(group, "role", None)


def typed_flags(overrides: Mapping[str, object]) -> dict[str, str]:
    """Path -> the spelling the user typed, where the overrides recorded it (a plain mapping records none)."""
    return overrides.flags if isinstance(overrides, Overrides) else {}


def flag_fields(overrides: Mapping[str, object], groups: object) -> dict[str, str]:
    """Config path -> the flag that set it. `groups` is the instance list the overrides landed in
    (raw dicts or models), which turns `instances[prefill].count` into `instances[<i>].count`. The flag
    is the spelling the user typed where the overrides recorded it (`Overrides.flags`)."""
    typed = typed_flags(overrides)
    fields: dict[str, str] = {}
    for path in overrides:
        flag = typed.get(path) or FLAG_FOR_PATH.get(path)
        if flag is None:
            continue
        role = ROLE_PATH.match(path)
        if role is None:
            fields[path] = flag
            continue
        if isinstance(groups, list):
            index = next((i for i, g in enumerate(groups) if _role(g) == role.group(1)), None)
            if index is not None:
                fields[f"instances[{index}].{role.group(2)}"] = flag
    return fields


def name_flags(problems: list[Problem], flags: dict[str, str]) -> list[Problem]:
    """Each problem about a flag-set value (or an item of it: `model.served_model_name[0]`), renamed to
    the flag, its message in flag terms ("lower --num-gpu-blocks to N", not `cache.num_gpu_blocks`); the
    others unchanged (a file key's hint may say where a key belongs in the file)."""
    def named(field: str) -> str:
        return flags.get(field) or flags.get(re.sub(r"\[\d+\]$", "", field), field)

    return [Problem(named(field), message if named(field) == field else in_flag_terms(message, flags))
            for field, message in problems]
