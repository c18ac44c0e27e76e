"""One choice's tool calling as a stream, shaped like vLLM's deltas: `delta.tool_calls[i] = {index, id, type,
function: {name, arguments}}`, later ones only `{index, function: {arguments}}`.

A named call streams its arguments as they come; auto streams content until a tool call may start (the text
from `<tool_call>`, or a reply that opens with "{" unless response_format / structured_outputs asked for the answer,
is held back) and sends the parsed calls when the request ends; required sends them at the end too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pdlaunch.http import JsonObject
from pdlaunch.server.tool_call_parsers import HERMES_START, PYTHON_TAG
from pdlaunch.server.tool_calls import ToolCalling


@dataclass
class ToolStream:
    """The streamed view of one choice's tool calling: what each chunk's delta carries."""

    calling: ToolCalling
    text: str = ""
    sent: int = 0  # characters of `text` sent as content (auto) or arguments (named)
    call_id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    opened: bool = False  # named: the first delta (id, type, name) went out

    def delta(self, new_text: str, finished: bool) -> JsonObject:
        self.text += new_text
        if self.calling.mode == "named":
            piece, self.sent = self.text[self.sent:], len(self.text)
            if self.opened:
                return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
            self.opened = True
            return {"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                    "function": {"name": self.calling.named, "arguments": piece}}]}
        content = ""
        if self.calling.mode == "none":
            self.sent = len(self.text)
            return {"content": new_text} if new_text or finished else {}
        if self.calling.mode == "auto":
            safe = self._content_end(finished)
            content = self.text[self.sent:safe] if safe > self.sent else ""
            self.sent = max(self.sent, safe)
        calls: list[JsonObject] = []
        if finished:
            whole, calls = self.calling.parse(self.text)
            if not calls and self.calling.mode == "auto" and len(self.text) > self.sent:
                # the whole answer's content, held back until now (it opened as a call may: sent is 0)
                content += (whole or "")[self.sent:]
                self.sent = len(self.text)
        delta: JsonObject = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        return delta

    def _content_end(self, finished: bool) -> int:
        """How far the text is surely content: up to a tool call's possible start."""
        start = self.text.find(HERMES_START)
        if start >= 0:
            return start
        json_calls = not self.calling.answer_asked  # a Llama 3 JSON call may come (tool_calls.py)
        if json_calls and self.text.lstrip().startswith(("{", PYTHON_TAG)):
            return 0
        if finished:
            return len(self.text)
        if json_calls and PYTHON_TAG.startswith(self.text.lstrip()):  # the tag may be arriving in pieces
            return 0
        for n in range(min(len(HERMES_START) - 1, len(self.text)), 0, -1):  # a marker may be arriving
            if HERMES_START.startswith(self.text[-n:]):
                return len(self.text) - n
        return len(self.text) if self.text.strip() else 0
