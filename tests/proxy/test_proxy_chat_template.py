"""A deployment's own chat template (`model.chat_template`) reaches the proxy too: the prompt token ids it counts and
hashes (prefix routing, per-request disaggregation) are the ones its instances compute, which apply that template."""

from __future__ import annotations

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, proxy_policy_args
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.disaggregate import PromptTokens
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.prompts import tokenize

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}<<assistant>>"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}]}


def test_the_proxy_counts_the_tokens_an_instance_with_the_template_computes() -> None:
    tiny = resolve_model_path("tiny")
    instance = Tokenizer(tiny)
    instance.override_chat_template(TEMPLATE)
    computed = tokenize(instance, ChatCompletionRequest.model_validate(BODY).template_messages())
    assert PromptTokens(tiny, TEMPLATE).ids_now(BODY, chat=True) == computed
    assert PromptTokens(tiny).ids_now(BODY, chat=True) != computed  # the checkpoint's own template differs


def test_the_launcher_passes_the_template_when_the_proxy_tokenizes() -> None:
    cfg = DeploymentConfig.model_validate({"model": {"path": "tiny", "chat_template": TEMPLATE},
                                          "proxy": {"routing_policy": "prefix"}})
    args = proxy_policy_args(cfg, lambda: "tiny")
    assert args[args.index("--chat-template") + 1] == TEMPLATE
    parsed = parse_args(["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", *args])
    assert parsed.chat_template == TEMPLATE
    plain = DeploymentConfig.model_validate({"model": {"path": "tiny", "chat_template": TEMPLATE}})
    assert "--chat-template" not in proxy_policy_args(plain, lambda: "tiny")  # round robin tokenizes nothing


def test_a_template_without_a_tokenizer_or_that_does_not_parse_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    for extra, said in ((["--chat-template", TEMPLATE], "--chat-template"),
                        (["--tokenizer", "tiny", "--chat-template", "{% for m in messages %}"], "does not parse")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", *extra])
        assert exit_.value.code != 0 and said in capsys.readouterr().err
