"""The rules a deployment is checked by, one module per concern; `config/validate.py` runs them all.

`roles` (roles, nodes, what TP splits, P/D TP ratio, cache sizes), `checkpoint` (tokenizer, weight headers,
FP8 scales and block edges), `chat_template` (the file or template text of `model.chat_template`), `memory`
(weights + KV per rank against the device), `resources` (port ranges and device sharing), `security` (the
deployment secret), `host` (log_dir, what the KV connector needs installed here).
"""
