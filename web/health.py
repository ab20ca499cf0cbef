"""The /health route for load balancers and Space probes: 200 while a model serves, else 503."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine.api import no_gpu_here

HEALTHY_STATES = ("ready", "degraded")  # /health answers 200 for these, 503 otherwise
# What each state means for a person reading /health; loading, failed and restarting add the
# engine's own line (the step, the error) after it.
STATE_MESSAGES = {
    "ready": "The model serves.",
    "degraded": "The model serves; a recent reply failed and the engine recovered.",
    "empty": "No model is loaded: press Load on the page (the app was started with --no-load, "
    "or no load has run yet).",
    "loading": "The model is loading; replies start when it is ready.",
    "failed": "The model failed to load; the page's model panel shows why. Load it again, or "
    "pick a smaller branch, context or cache.",
    "restarting": "The engine process is restarting with the same model.",
    "stalled": "The engine stopped making progress; its replies ended with an error and it is "
    "being restarted with the same model.",
}


def health_body(engine) -> tuple[dict, int]:
    """{"state", "message"} and the status code /health answers with."""
    if engine.gpu_info() is None:
        return {"state": "no_gpu", "message": no_gpu_here()}, 503
    state = engine.health
    message = STATE_MESSAGES.get(state, state)
    detail = engine.status.message
    if state in ("loading", "failed", "restarting") and detail:
        message = f"{message} {detail}"
    return {"state": state, "message": message}, 200 if state in HEALTHY_STATES else 503


def health_route(engine) -> Route:
    """GET /health: 200 and {"state", "message"} while the model serves; 503 loading or without."""

    def health(_request: Request) -> JSONResponse:
        body, code = health_body(engine)
        return JSONResponse(body, status_code=code)

    return Route("/health", health, methods=["GET"])
