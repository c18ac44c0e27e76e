"""The HTTP pieces the instance server (server/) and the proxy (proxy/) share, so that a client sees
the same behaviour whichever answered: OpenAI-shaped errors (errors.py), SSE framing and parsing
(sse.py), the client's disconnect (disconnect.py), access control (auth.py) and request bounds
(limits.py), as ASGI middleware on one base (asgi.py); and another process's answer read whole within one
deadline and a size bound (answers.py), which the launcher uses too."""

from pydantic import JsonValue

# JSON as the bodies hold it: pydantic's JsonValue (str, int, float, bool, None, and lists and str-keyed
# dicts of them; pydantic validates fields of this type), for values that really are arbitrary JSON.
# Bodies the server and the proxy build are JsonObjects.
JsonObject = dict[str, JsonValue]

__all__ = ["JsonObject", "JsonValue"]
