"""Sekisho's Azure Functions app (Python v2 programming model).

Every HTTP function is thin: it hands the request to the gateway package (`shared/`). HTTP
streaming is on (azurefunctions-extensions-http-fastapi), so all HTTP functions take and return
the FastAPI (Starlette) types. The local host (`python -m shared.localhost`) serves exactly the
functions registered here, read off `app`.

Two rules of the Functions host shape the routes: a route may not start with `admin` or
`runtime` (reserved for the host's own APIs; such a function is refused at indexing), and the
host takes the first registered route that matches, not the most specific one — so no two
routes here may match the same path, and there is no catch-all route.
"""
import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response

from shared.gateway import Gateway
from shared.routes import HEALTH_ROUTE, ROUTES_BY_FUNCTION

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
gateway = Gateway()  # the one application context; opens its connections on first use


def _register(name: str):
    """Register a POST model route whose handler hands the request to the gateway."""
    route = ROUTES_BY_FUNCTION[name]

    async def handler(req: Request) -> Response:
        return await gateway.handle(req, route)

    handler.__name__ = handler.__qualname__ = name
    app.function_name(name)(app.route(route=route.template, methods=["POST"])(handler))


for _name in ROUTES_BY_FUNCTION:
    _register(_name)


@app.function_name("health")
@app.route(route=HEALTH_ROUTE, methods=["GET"])
async def health(req: Request) -> Response:
    return await gateway.health()
