"""supervision.stall_restart_seconds in the manifests: a livenessProbe of each instance's leader container, so that
the kubelet restarts a pod whose /health stops answering for about that long, as `pdlaunch serve`'s launcher
restarts a stalled instance (launcher/stall_watch.py).

The launcher counts a stall only from a probe that got no answer in proxy.health_timeout_seconds: a 503 (loading,
sleeping) is an answer. A kubelet httpGet probe fails on any status >= 400, and would restart an instance put to
sleep or still loading its model; so the probe runs a few lines of Python in the container that GET /health and
pass on any answer, failing only on no answer in time (or a refused connection).

Derived: each probe gives /health health_timeout_seconds (the kubelet's timeoutSeconds is 1 s more, for the
interpreter's start, rounded up to whole seconds, as the kubelet counts them); it probes every timeoutSeconds
(periodSeconds, so that one probe ends before the next); the restart comes at the failureThreshold-th failure in a
row, (failureThreshold - 1) * periodSeconds after the first, the first whole multiple of the period at or above
stall_restart_seconds. A startupProbe of the same command holds the liveness probe off until the server first
answers (it binds its port after its imports, before the model loads, which /health answers as loading)."""

from __future__ import annotations

import math

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.render.core_api import Container, Probe

# GET /health on the pod's address; any answer passes, none within argv[2] seconds fails (exit 1, the reason on
# stderr). POD_IP is in every engine container's environment (objects.pod_env).
HEALTH_ANSWERS = (
    "import http.client, os, sys\n"
    "c = http.client.HTTPConnection(os.environ['POD_IP'], int(sys.argv[1]), timeout=float(sys.argv[2]))\n"
    "c.request('GET', '/health')\n"
    "c.getresponse()\n"
)
STARTUP_PERIOD_S = 5
STARTUP_LIMIT_S = 600  # the server's imports before it binds its port: a cold image on a slow disk


def liveness_probes(cfg: DeploymentConfig, http_port: int) -> tuple[Probe, Probe] | None:
    """(livenessProbe, startupProbe) of a leader container serving /health on `http_port`; None when
    supervision.stall_restart_seconds is unset (a stalled instance is left running, as the launcher leaves it)."""
    stall_s = cfg.supervision.stall_restart_seconds
    if stall_s is None:
        return None
    health_s = cfg.proxy.health_timeout_seconds
    timeout = math.ceil(health_s) + 1
    command = ["python", "-c", HEALTH_ANSWERS, str(http_port), f"{health_s:g}"]
    liveness: Probe = {"exec": {"command": command}, "timeoutSeconds": timeout, "periodSeconds": timeout,
                       "failureThreshold": 1 + math.ceil(stall_s / timeout)}
    startup: Probe = {"exec": {"command": list(command)}, "timeoutSeconds": timeout, "periodSeconds": STARTUP_PERIOD_S,
                      "failureThreshold": STARTUP_LIMIT_S // STARTUP_PERIOD_S}
    return liveness, startup


def add_liveness(engine: Container, cfg: DeploymentConfig, http_port: int) -> None:
    """The probes of liveness_probes on the leader container `engine`, when stall_restart_seconds is set."""
    probes = liveness_probes(cfg, http_port)
    if probes is not None:
        engine["livenessProbe"], engine["startupProbe"] = probes
