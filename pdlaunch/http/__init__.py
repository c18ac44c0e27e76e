"""The HTTP pieces the instance server (server/) and the proxy (proxy/) share, so that a client sees
the same behaviour whichever answered: OpenAI-shaped errors (errors.py), SSE framing and parsing
(sse.py), the client's disconnect (disconnect.py), access control (auth.py) and request bounds
(limits.py), as ASGI middleware on one base (asgi.py)."""
