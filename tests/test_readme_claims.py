"""README.md (and docs/) claims that the code can check: the configuration reference's defaults and flags, the
flags of every command example, the metric names, the module maps and the troubleshooting table's messages.

tests/test_readme.py checks the other direction (every config key is in the reference) and the set-up commands;
tests/test_readme_fields.py the request fields table. Nothing here starts a process.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import pdlaunch.proxy.__main__ as proxy_main
from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.engine_config import DECODE_TOKEN_BUDGET, PROMPT_TOKEN_BUDGET
from pdlaunch.config.flags import KV_TRANSFER_CONFIG, SERVE_FLAGS
from pdlaunch.config.topology_config import InstanceGroupConfig
from pdlaunch.errors import ArgumentParser
from pdlaunch.render.kubernetes import POD_RENDEZVOUS_TIMEOUT_S
from tests.test_layering import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pdlaunch"
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
SOURCE = {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*|(?<![\w-])-[a-z]{1,2}\b")


def section(text: str, heading: str, end: str) -> str:
    start = text.index(heading)
    return text[start:text.index(end, start + len(heading))]


# --- the configuration reference ---------------------------------------------------------------------------

# Defaults the models leave unset (None) or draw (a factory) and a rule fills in: the cell README gives them.
DERIVED_DEFAULTS = {
    "scheduler.max_num_batched_tokens":
        f"`{PROMPT_TOKEN_BUDGET}` colocated and prefill, `{DECODE_TOKEN_BUDGET}` decode",
    "scheduler.async_scheduling": "unset: on with CUDA, off on CPU",
    "parallel.rendezvous_timeout_seconds": f"`120.0` (`{POD_RENDEZVOUS_TIMEOUT_S}` in `render kubernetes` manifests)",
    "kv_transfer.engine_id": "`new uuid`",
    "instances": " + ".join(f"{g.count} {g.role}" for g in DeploymentConfig().instances).join("``"),
}


def field_default(model: type[BaseModel], dotted: str) -> Any:
    *parents, name = dotted.split(".")
    for part in parents:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), f"{dotted}: {part} is no section"
        model = annotation
    assert name in model.model_fields, f"README's configuration reference names `{dotted}`, which no model has"
    field = model.model_fields[name]
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
    return field.default


def reference_rows() -> list[tuple[type[BaseModel], str, str, str]]:
    """(model, key, default cell, flag cell) of each row of the two configuration tables."""
    text = section(README, "## Configuration reference", "### Environment variables")
    groups = text.index("Instance group keys")
    rows = []
    for match in re.finditer(r"^\| `([a-z_.]+)` \| (.*?) \| (.*?) \|", text, re.M):
        group_row = match.start() > groups
        rows.append((InstanceGroupConfig if group_row else DeploymentConfig, match.group(1), match.group(2),
                     "" if group_row else match.group(3)))
    return rows


def serve_options() -> set[str]:
    return command_options()["serve"]


def command_options() -> dict[str, set[str]]:
    """Every option of every `pdlaunch ...` command, by its command line ("serve", "bench compare")."""
    found: dict[str, set[str]] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
            return
        found[" ".join(path)] = {"--help", "-h"} | {
            o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", [])) if o.startswith("-")}

    walk(typer.main.get_command(app), ())
    return found


class _Parser(Exception):
    pass


def proxy_options(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The flags of `python -m pdlaunch.proxy`, from the parser its parse_args builds."""

    class Recording(ArgumentParser):
        def parse_args(self, *args: Any, **kwargs: Any) -> Any:
            raise _Parser(self)

    monkeypatch.setattr(proxy_main, "ArgumentParser", Recording)
    with pytest.raises(_Parser) as caught:
        proxy_main.parse_args([])
    parser = caught.value.args[0]
    assert isinstance(parser, argparse.ArgumentParser)
    return set(parser._option_string_actions)


def test_the_reference_gives_each_key_its_default_and_flags() -> None:
    wrong = []
    serve = serve_options()
    for model, key, cell, flags in reference_rows():
        default = field_default(model, key)
        expected = DERIVED_DEFAULTS.get(key, f"`{default}`")
        if cell != expected:
            wrong.append(f"`{key}`: README says {cell}, the code {expected}")
        wrong += [f"`{key}`: `serve` has no {flag}" for flag in FLAG.findall(flags) if flag not in serve]
    assert not wrong, "README's configuration reference is wrong:\n" + "\n".join(wrong)


def test_every_serve_flag_is_on_its_keys_row() -> None:
    """README: "Every flag has a YAML key (table below)": each flag (not a refused vLLM spelling) is named on the
    row of the key it sets; `instances[ROLE].KEY` on KEY's row of the instance group table."""
    rows = {(model, key): flags for model, key, _, flags in reference_rows()}
    group_rows = {key: line for line in README.splitlines() for key in InstanceGroupConfig.model_fields
                  if line.startswith(f"| `{key}` |") and "instances[i]" not in line}
    missing = []
    for flag in SERVE_FLAGS:
        if flag.refused:
            continue
        role_key = re.fullmatch(r"instances\[\w+\]\.(\w+)", flag.path)
        if flag.path == KV_TRANSFER_CONFIG:
            row = rows[(DeploymentConfig, "kv_transfer.connector")]
        elif role_key and role_key.group(1) == "count":
            row = rows[(DeploymentConfig, "instances")]
        elif role_key:
            row = group_rows[role_key.group(1)]
        else:
            row = rows[(DeploymentConfig, flag.path)]
        missing += [f"{option} ({flag.path})" for option in flag.declaration.split("/")
                    if not re.search(rf"`{re.escape(option)}(?![\w-])", row)]
    assert not missing, f"README's configuration reference does not name these flags on their key's row: {missing}"


def config_path_exists(path: str) -> bool:
    model: Any = DeploymentConfig
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


@pytest.mark.parametrize("doc", ["README.md", *DOCS])
def test_every_dotted_config_key_named_exists(doc: str) -> None:
    """A code span that starts with a config section's dotted key (`proxy.workers`, `kv_transfer.engine_id: X`)
    names a key of the models; file names (`proxy.log`, `security.py`) and tensor names are not keys."""
    sections = [name for name, field in DeploymentConfig.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)]
    key = re.compile(rf"({'|'.join(sections)})(\.[a-z_]+)+(?![\w.-])")
    text = README if doc == "README.md" else DOCS[doc]
    named = {m.group(0) for span in re.findall(r"`([^`\n]+)`", text) if (m := key.match(span))}
    unknown = {path for path in named
               if not path.endswith((".py", ".log", ".safetensors", ".json")) and not config_path_exists(path)}
    assert not unknown, f"{doc} names config keys the models lack: {sorted(unknown)}"


# --- the flags of command examples ---------------------------------------------------------------------------

def command_examples(text: str, commands: list[str]) -> list[tuple[str, str, str]]:
    """(command, flags text, line) for each `pdlaunch CMD ...` / `python -m pdlaunch.proxy ...` in a code span or
    fenced block: what follows the command up to the next command, shell operator or comment."""
    longest_first = sorted(commands, key=len, reverse=True)
    names = "|".join(map(re.escape, longest_first))
    command = re.compile(rf"(?:\bpdlaunch|python -m pdlaunch)\s+({names})(?![\w-])|python -m (pdlaunch\.proxy)\b")
    found = []
    for code in re.findall(r"```.*?```|`[^`\n]+`", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", code).splitlines():  # a line ending in \ goes on on the next
            matches = list(command.finditer(line))
            for i, match in enumerate(matches):
                end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
                tail = re.split(r"\s(?:&&|\|\||\||;|&)\s|\s#|\s&$", line[match.end():end])[0]
                found.append((match.group(1) or "proxy", tail, line.strip()))
    return found


@pytest.mark.parametrize("doc", ["README.md", *DOCS])
def test_every_flag_of_a_command_example_exists(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {**command_options(), "proxy": proxy_options(monkeypatch)}
    text = README if doc == "README.md" else DOCS[doc]
    unknown = [f"{command}: {flag} in {line!r}" for command, tail, line in command_examples(text, list(options))
               for flag in FLAG.findall(tail) if flag not in options[command] and flag != "-"]
    assert not unknown, f"{doc} shows flags these commands do not have:\n" + "\n".join(unknown)


# --- metric names ---------------------------------------------------------------------------------------------

# Names README gives as what is *not* exported (a former name): they must stay absent.
NOT_EXPORTED = {"vllm:time_per_output_token_seconds"}
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def metric_names(text: str) -> set[str]:
    names = set()
    for match in re.finditer(r"(?:pdlaunch_|vllm:)[a-z0-9_]*(?:\{[a-z0-9_,]+\}[a-z0-9_]*)?", text):
        name = match.group(0)
        braces = re.search(r"\{([a-z0-9_,]+)\}", name)
        if braces and "," in braces.group(1):  # pdlaunch_kv_offload_{stored,loaded}_blocks_total
            names |= {name.replace(braces.group(0), part) for part in braces.group(1).split(",")}
        else:
            names.add(name.split("{")[0])
    return {name for name in names if not name.endswith(("_", ":"))}


def exported(name: str) -> bool:
    """Whether a metric of that name, as given or less one of prometheus_client's suffixes (a gauge may end in
    _total itself: pdlaunch_kv_blocks_total), is a string in pdlaunch/."""
    forms = {name, *(name.removesuffix(suffix) for suffix in SUFFIXES)}
    return any(f'"{form}"' in text or f"'{form}'" in text for form in forms for text in SOURCE.values())


@pytest.mark.parametrize("doc", ["README.md", *DOCS])
def test_every_metric_named_is_exported(doc: str) -> None:
    names = metric_names(README if doc == "README.md" else DOCS[doc])
    missing = sorted(name for name in names - NOT_EXPORTED if not exported(name))
    assert not missing, f"{doc} names metrics that pdlaunch/ does not export: {missing}"
    assert not [name for name in NOT_EXPORTED if exported(name)]


# --- the module maps ------------------------------------------------------------------------------------------

def test_readme_module_map_lists_the_package() -> None:
    block = section(README, "## Module map", "```\n\n")
    listed = set(re.findall(r"^  ([\w]+/|[\w]+\.py)\s", block, re.M))
    on_disk = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    on_disk |= {p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}}
    assert listed == on_disk, f"README's module map: not on disk {listed - on_disk}, unlisted {on_disk - listed}"
    order = [name.removesuffix("/").removesuffix(".py") for name in re.findall(r"^  ([\w]+/|[\w]+\.py)\s", block, re.M)]
    layer = {name: index for index, names in enumerate(LAYERS) for name in names}
    assert [layer[name] for name in order] == sorted(layer[name] for name in order), \
        f"README's module map is not bottom layer first (tests/test_layering.py LAYERS): {order}"
    top = set(re.findall(r"^([\w]+)/\s", block, re.M)) - {"pdlaunch"}
    assert all((ROOT / name).is_dir() for name in top), top


def modules_sections() -> list[tuple[Path, str]]:
    """(folder, text) of each `## folder/ - ...` section of docs/modules.md; the rest belongs to pdlaunch/."""
    sections = []
    for part in re.split(r"^## ", DOCS["modules.md"], flags=re.M)[1:]:
        head, _, body = part.partition("\n")
        folder = re.match(r"(\w+)/ ", head)
        sections.append((PACKAGE / folder.group(1) if folder else PACKAGE, body))
    return sections


def test_docs_modules_names_every_module_and_only_those() -> None:
    wrong = []
    for folder, body in modules_sections():
        for name in re.findall(r"`([\w/]+\.py)`", body):
            if not ((folder / name).exists() or (PACKAGE / name).exists() or (ROOT / name).exists()
                    or any(folder.rglob(name))):
                wrong.append(f"{folder.relative_to(ROOT)}: `{name}` does not exist")
        if folder == PACKAGE:
            continue
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if path.name != "__init__.py" and not re.search(rf"(?<![\w/]){re.escape(path.name)}`", body) \
                    and f"`{relative}`" not in body:
                wrong.append(f"{folder.relative_to(ROOT)}: {relative} is not described")
    package_text = "".join(body for folder, body in modules_sections() if folder == PACKAGE)
    for path in sorted([*PACKAGE.glob("*.py"), *(PACKAGE / "metrics").glob("*.py")]):
        if path.name != "__init__.py" and f"`{path.name}`" not in package_text:
            wrong.append(f"{path.relative_to(ROOT)} is not described")
    assert not wrong, "docs/modules.md is out of date:\n" + "\n".join(wrong)


# --- troubleshooting messages ---------------------------------------------------------------------------------

# Messages put together at run time from parts (a variable holds the middle): no three of their words in a row
# stand in one string of the source. Each entry: the message's start -> a piece of the source that makes it.
COMPOSED = {
    "log_dir: '...' is writable by its group": "is writable by {who} (mode {mode:04o})",
    "security.api_key: input should be a valid string": "(value hidden{size})",  # pydantic's message, then ours
    "security.deployment_secret: string should have": "(value hidden{size})",
    "--burstiness: nan is not a number": "is not a number (NaN); give ",
    "--num-prompts: 0 must be at least 1; give": '("ge", "must be at least")',
    "--input-lens: item 2: 0 must be at least": '("ge", "must be at least")',
    "needs N GPUs but": "GPUs (count x tp summed over groups) but",
    "warning: --tp: has no effect: every instance takes": "instance takes its TP size",
    "warning: --transfer-mode: has no effect with the": "has no effect with the {connector} connector: only ",
    "parallel.nodes[K].devices: node K needs": "GPUs (count x tp summed over ",
    "shape mismatch for expert": "shape mismatch for {",
    "--num-gpu-blocks: the KV cache": "did not fit in ",
    "SIGINT received while connecting": "received while {doing}; stopping",
    "SIGINT received while listing": "listing the Ray cluster's nodes",
    "SIGINT received while disconnecting": "disconnecting from the Ray cluster",
    "error: node K: device: auto resolved": "auto resolved to {device} on node {node}",
    "... due to time limit": 'f" due to {due.strip().lower()}"',
    "... due to preemption": 'f" due to {due.strip().lower()}"',
    "kv_cache_scheme quantizes": "kv_cache_scheme quantizes the KV cache to {",
    "tensor '...weight_scale_inv' holds nan": "but a scale is finite and {",
    "...k_scale' holds 0.0": "but a scale is finite and {",
    "see its lines": "its lines ('{self.name} rank {rank}') in {where}",
    "sent a message this version cannot read": "a message this version cannot read",
    "sent a malformed": "{peer} sent {what}",
    "config: cannot read": "cannot read {",
    "error: no live decode instance": 'f"no live {role} instance"',
    "kv_transfer.mooncake_protocol: Mooncake peer": "moves KV over {peer.protocol} and this engine ",
    "warning: proxy.port (in --config): compare starts": "compare starts each deployment with {_OWN[path]}, so ",
    "security.api_key: the key ends with a newline": "the key {what}: no HTTP client can send it",
    "--backend: scontrol show hostnames NODES failed: Could not": "` failed: {_scontrol_reason(",
}


def one_line(text: str) -> str:
    """Source with the strings Python joins (one literal per line) joined, and its whitespace collapsed."""
    joined = re.sub(r"([\"'])\s*\n\s*(?:#[^\n]*\n\s*)*[rfb]*([\"'])", "", text)
    return " ".join(joined.split())


SOURCE_TEXT = " ".join(one_line(text) for text in SOURCE.values())


def literal_text(source: str) -> str:
    """The text of the string literals of one module, docstrings left out (f-strings with {} for each value):
    what the code can print, not what its comments say."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    pieces = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            pieces.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            pieces.append(node.value)
    return " | ".join(" ".join(piece.split()) for piece in pieces)


LITERAL_TEXT = " | ".join(literal_text(text) for text in SOURCE.values())


def troubleshooting_messages() -> list[str]:
    text = README[README.index("## Troubleshooting"):]
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
    return [message for row in rows for message in re.findall(r"`([^`]+)`", row)]


def word_runs(message: str) -> list[str]:
    """The runs of three or more plain words (no placeholder, number, flag or path among them)."""
    runs, run = [], []
    for word in [*message.split(), "|"]:
        if re.fullmatch(r"[a-z][a-z']*,?", word):
            run.append(word)
            continue
        if len(run) >= 3:
            runs.append(" ".join(run))
        run = []
    return runs


def test_troubleshooting_messages_are_the_codes() -> None:
    """Each quoted message's runs of three or more plain words stand in pdlaunch/'s string literals (a comment or a
    docstring does not count): those covering at least half of the runs' words, so that a message reworded in the
    code, not only one gone, fails here. N, M, '...', numbers and names are the parts it fills in; a message put
    together from parts names a piece of the source in COMPOSED instead."""
    wrong = []
    for message in troubleshooting_messages():
        runs = word_runs(message)
        composed = [piece for start, piece in COMPOSED.items() if message.lstrip().startswith(start)]
        if composed:
            wrong += [f"{message!r}: COMPOSED's {piece!r} is not in the source" for piece in composed
                      if piece not in SOURCE_TEXT]
        elif runs:
            words = sum(len(run.split()) for run in runs)
            found = sum(len(run.split()) for run in runs if run in LITERAL_TEXT)
            if 2 * found < words:
                wrong.append(f"{message!r}: of its runs {runs} only {[r for r in runs if r in LITERAL_TEXT]} are "
                             "in pdlaunch/'s strings")
    assert not wrong, "README's troubleshooting table quotes messages the code does not print:\n" + "\n".join(wrong)


# --- environment variables ------------------------------------------------------------------------------------

def env_choices() -> dict[str, list[str]]:
    """Each `env_choice("PDLAUNCH_X", (...))` of pdlaunch/: the variable's values, its default first."""
    found = {}
    for text in SOURCE.values():
        for call in ast.walk(ast.parse(text)):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "env_choice" \
                    and isinstance(call.args[0], ast.Constant) and isinstance(call.args[1], ast.Tuple):
                found[call.args[0].value] = [element.value for element in call.args[1].elts
                                             if isinstance(element, ast.Constant)]
    return found


def test_environment_variables_list_the_values_the_code_takes() -> None:
    """README's Environment variables table gives an `env_choice` variable's values as the code has them."""
    table = section(README, "### Environment variables", "## Troubleshooting")
    choices = env_choices()
    assert choices, "no env_choice call found in pdlaunch/"
    wrong = []
    for variable, values in choices.items():
        rows = [line.split(" | ") for line in table.splitlines()
                if line.startswith("| ") and f"`{variable}`" in line.split(" | ")[0]]
        if len(rows) != 1:
            wrong.append(f"{variable}: {len(rows)} rows")
        elif re.findall(r"`([^`]+)`", rows[0][2]) != values:
            wrong.append(f"{variable}: README gives {rows[0][2]!r}, the code takes {values} ({values[0]} unset)")
    assert not wrong, "README's Environment variables table is wrong:\n" + "\n".join(wrong)
