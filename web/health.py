"""The /health route for load balancers and Space probes: 200 while a model serves, else 503."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HEALTHY_STATES = ("ready", "degraded")  # /health answers 200 for these, 503 otherwise


def health_route(engine) -> Route:
    """GET /health: 200 and {"state": …} while the model serves; 503 loading or without one."""

    def health(_request: Request) -> JSONResponse:
        state = engine.health if engine.gpu_info() is not None else "no_gpu"
        code = 200 if state in HEALTHY_STATES else 503
        return JSONResponse({"state": state}, status_code=code)

    return Route("/health", health, methods=["GET"])
