"""What the client has of a stream relayed with migration, and a continuation's chunks rewritten into it.

The decode leg asks for the token ids (`return_token_ids`, which also brings the prompt's ids in the first
chunk). Ids generated after the last chunk that carried text (the old decode held their text back: a
character not complete yet) are not in a continuation's prompt: the new decode makes them again and hands
out their text; a greedy stream is then the uninterrupted run's text, with no character repeated or
missing. A client that asked for the ids gets each with the chunk that carries its text (or the last one): the
new decode may make other ids than those held back (sampling without a seed; another machine's numerics), and the
ids the client has are always those of the text it has. The new decode's chunks are rewritten into the client's
stream (its id, model, object; chat deltas; usage counting the whole request).

A chunk of several ids with text (a foreign decode's step: speculative decoding, a stream interval) may hold back
its last ids (their character not complete yet) while its text covers the first: which ones is not known without
the tokenizer, so such a stream is not continued (`bundled`) until a chunk of one id brings text again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import JsonValue

from pdlaunch.proxy.bodies import JsonObject, as_object, ids_of, int_of, list_of, objects


@dataclass
class Progress:
    """What the client has of one streamed request."""

    chat: bool
    client_ids: bool  # the client asked for return_token_ids itself
    prompt_ids: list[int] | None = None
    ids: list[int] = field(default_factory=list)  # output ids received, in order
    committed: int = 0  # of `ids`: those whose text the client has (and, asking for them, the ids themselves)
    # ids of the last chunk with text when it carried several (a foreign decode's step: its text may not cover the
    # last of them), until a chunk of one id brings text or the finish; 0: `committed` is exact
    bundled: int = 0
    offset: int = 0  # output ids given in the current decode's prompt
    head: JsonObject | None = None  # id / object / created / model of the client's stream
    finished: bool = False  # a finish_reason was sent
    usage_sent: bool = False  # a chunk with usage was sent
    done: bool = False  # [DONE] or an error event was sent

    def rewrite(self, chunk: JsonObject, continued: bool) -> JsonObject | None:
        """Record `chunk`'s ids and text; the chunk as the client gets it (None: nothing for the client,
        a chunk sent only for the ids we asked for). ValueError for ids that are not integers (bodies.ids_of)."""
        if self.head is None:
            self.head = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        prompt_ids = chunk.get("prompt_token_ids")
        for choice in objects(chunk.get("choices")):
            prompt_ids = choice.get("prompt_token_ids", prompt_ids)
            new_ids = ids_of(choice.get("token_ids"))
            self.ids += new_ids
            delta = as_object(choice.get("delta")) or {}
            text = choice.get("text") if "text" in choice else delta.get("content")
            shown = self.committed
            # text of one id: the decode's detokenizer consumed every id so far (it holds back a character not complete
            # yet whole, as vLLM's). A foreign decode's chunk of several ids (speculative decoding, a stream interval)
            # may have text for the first of them while it holds back the last: which ones, only a tokenizer could say.
            if text or choice.get("finish_reason") is not None:
                self.committed = len(self.ids)
                self.bundled = len(new_ids) if text and choice.get("finish_reason") is None and len(new_ids) > 1 else 0
            if choice.get("finish_reason") is not None:
                self.finished = True
            if self.client_ids:  # ids held back wait for their text: a continuation may make others in their place
                choice["token_ids"] = list(self.ids[shown:self.committed])
        if self.prompt_ids is None and isinstance(prompt_ids, list):
            self.prompt_ids = ids_of(prompt_ids)
        self.usage_sent = self.usage_sent or bool(chunk.get("usage"))
        if continued:
            chunk = self._as_client_chunk(chunk)
        if not self.client_ids:
            chunk.pop("prompt_token_ids", None)
            for choice in objects(chunk.get("choices")):
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        return None if _carries_nothing(chunk) else chunk

    def _as_client_chunk(self, chunk: JsonObject) -> JsonObject:
        """A continuation's completion chunk in the client's stream (same id; a chat delta for chat)."""
        out = {**chunk, **(self.head or {})}
        out.pop("prompt_token_ids", None)
        choices: list[JsonValue] = []
        for choice in list_of(chunk.get("choices")):
            if self.chat and isinstance(choice, dict):
                entry: JsonObject = {"index": 0, "delta": {"content": choice.get("text", "")},
                                     "finish_reason": choice.get("finish_reason"),
                                     "stop_reason": choice.get("stop_reason"), "logprobs": None}
                if self.client_ids:
                    entry["token_ids"] = choice.get("token_ids", [])
                choices.append(entry)
            elif isinstance(choice, dict):  # the continuation's prompt (the client's + output ids) is not the client's
                choices.append({k: v for k, v in choice.items() if k != "prompt_token_ids"})
        out["choices"] = choices
        usage = as_object(chunk.get("usage"))
        if usage is not None and self.prompt_ids is not None:
            out["usage"] = self.usage(int_of(usage.get("completion_tokens")) or 0, usage)
        return out

    def usage(self, continued_tokens: int, continuation: JsonObject | None = None) -> JsonObject:
        """The whole request's usage: the client's prompt once, every output token once (`continued_tokens`
        made by the current decode after the `offset` its prompt carried); cached tokens, as the continuation's
        decode counted them, at most the client's prompt (its cache may hold the output ids it was sent too)."""
        prompt = len(self.prompt_ids or [])
        completion = continued_tokens + self.offset
        out: JsonObject = {**(continuation or {}), "prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
        details = as_object(out.get("prompt_tokens_details"))
        cached = int_of(details.get("cached_tokens")) if details is not None else None
        if details is not None and cached is not None:
            out["prompt_tokens_details"] = {**details, "cached_tokens": min(cached, prompt)}
        return out

    def usage_chunk(self) -> JsonObject:
        """The usage chunk (stream_options.include_usage) of a stream whose decode failed after its last token's
        chunk, before the usage chunk: counted from the ids received (the cached tokens are not known)."""
        return {**(self.head or {}), "choices": [], "usage": self.usage(len(self.ids) - self.offset)}


def _carries_nothing(chunk: JsonObject) -> bool:
    """No text, role, finish, usage, token ids or anything else a client reads."""
    if chunk.get("usage") or chunk.get("kv_transfer_params") or chunk.get("prompt_token_ids"):
        return False
    for choice in list_of(chunk.get("choices")):
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("text") or \
                choice.get("logprobs") or choice.get("token_ids") or choice.get("prompt_token_ids"):
            return False
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items()):
            return False
    return bool(chunk.get("choices"))

