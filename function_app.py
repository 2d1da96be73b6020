"""Sekisho's Azure Functions app (Python v2 programming model).

Every HTTP function is thin: it hands the request to the gateway package (`shared/`). HTTP
streaming is on, through the app's own web extension for the worker runtime
(shared/http_streaming.py: a plain ASGI app in place of FastAPI's), so all HTTP functions take
and return Starlette's types. The local host (`python -m shared.local.host`) runs this module
through the Python worker runtime, as Azure does, and serves exactly the functions it indexes.

Two rules of the Functions host shape the routes: a route may not start with `admin` or
`runtime` (reserved for the host's own APIs; such a function is refused at indexing), and the
host takes the first registered route that matches, not the most specific one — so no two
routes here may match the same path, and there is no catch-all route.

Async jobs (`Prefer: respond-async`) run as a Durable Functions orchestration; the HTTP function
stores the job and enqueues it, and a queue-triggered starter with the durable client binding
starts the orchestration (why the queue: shared/jobs/orchestration.py). A timer function
settles batches and background responses that ended without the app polling them
(shared/jobs/deferred.py).
"""
import azure.durable_functions as df
import azure.functions as func

from shared.gateway import Gateway
from shared.http_streaming import Request, Response
from shared.jobs.documents import JOB_ROUTE
from shared.jobs.orchestration import ATTEMPT_ACTIVITY, GIVE_UP_ACTIVITY, ORCHESTRATOR, START_QUEUE, decode, encode, orchestrate_job
from shared.routes import ADMIN_PREFIX, HEALTH_ROUTE, ROUTES_BY_FUNCTION
from shared.worker_runtime import correct_http_streaming

correct_http_streaming()  # before the worker builds its web server (see shared/worker_runtime.py)
app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
gateway = Gateway()  # the one application context; opens its connections on first use


def _register(name: str):
    """Register a model route whose handler hands the request to the gateway."""
    route = ROUTES_BY_FUNCTION[name]

    async def handler(req: Request) -> Response:
        return await gateway.handle(req, route)

    handler.__name__ = handler.__qualname__ = name
    app.function_name(name)(app.route(route=route.template, methods=list(route.methods))(handler))


for _name in ROUTES_BY_FUNCTION:
    _register(_name)


@app.function_name("health")
@app.route(route=HEALTH_ROUTE, methods=["GET"])
async def health(req: Request) -> Response:
    return await gateway.health()


# Async jobs ---------------------------------------------------------------------------------
@app.function_name("job_status")
@app.route(route=JOB_ROUTE, methods=["GET"])
async def job_status(req: Request) -> Response:
    return await gateway.job_status(req, req.path_params["job_id"])


@app.function_name("job_starter")
@app.queue_trigger(arg_name="msg", queue_name=START_QUEUE, connection="AzureWebJobsStorage")
@app.durable_client_input(client_name="client")
async def job_starter(msg: func.QueueMessage, client) -> None:
    """Starts the job's orchestration; the job id is the instance id, so a redelivered message
    finds the instance and starts nothing."""
    start = decode(msg.get_body().decode("utf-8"))
    existing = await client.get_status(start["job_id"])
    if existing is not None and existing.runtime_status is not None:
        return
    await client.start_new(ORCHESTRATOR, instance_id=start["job_id"], client_input=encode(start))


@app.function_name(ORCHESTRATOR)
@app.orchestration_trigger(context_name="context")
def sekisho_job(context: df.DurableOrchestrationContext):
    return (yield from orchestrate_job(context))


@app.function_name(ATTEMPT_ACTIVITY)
@app.activity_trigger(input_name="task")
async def sekisho_job_attempt(task: str) -> str:
    return encode(await gateway.run_job_attempt(decode(task)))


@app.function_name(GIVE_UP_ACTIVITY)
@app.activity_trigger(input_name="task")
async def sekisho_job_give_up(task: str) -> str:
    return encode(await gateway.give_up_job(decode(task)))


# Batches and background responses: settled when they end ------------------------------------
@app.function_name("reconcile_deferred_work")
@app.timer_trigger(schedule="0 */5 * * * *", arg_name="timer", run_on_startup=False)
async def reconcile_deferred_work(timer: func.TimerRequest) -> None:
    """Every five minutes: batches and background responses that ended without the app polling
    them are settled (their log records written, their reservations brought to what they used),
    and budget alerts whose instance stopped before the webhook accepted them are sent again."""
    await gateway.reconcile_deferred_work()


# Admin API (admin app role required; see shared/admin/api.py) ----------------------------
@app.function_name("admin_page")
@app.route(route=ADMIN_PREFIX, methods=["GET"])
async def admin_page(req: Request) -> Response:
    return await gateway.admin_page(req)


@app.function_name("admin_login")
@app.route(route=f"{ADMIN_PREFIX}/login", methods=["GET"])
async def admin_login(req: Request) -> Response:
    return await gateway.admin_login(req)


@app.function_name("admin_reports")
@app.route(route=f"{ADMIN_PREFIX}/reports/{{report}}", methods=["GET"])
async def admin_reports(req: Request) -> Response:
    return await gateway.admin_reports(req, req.path_params["report"])


@app.function_name("admin_policies")
@app.route(route=f"{ADMIN_PREFIX}/policies", methods=["GET"])
async def admin_policies(req: Request) -> Response:
    return await gateway.admin_policies(req, None)


@app.function_name("admin_policy_defaults")
@app.route(route=f"{ADMIN_PREFIX}/policies/defaults", methods=["GET", "PUT", "DELETE"])
async def admin_policy_defaults(req: Request) -> Response:
    return await gateway.admin_policies(req, "defaults")


@app.function_name("admin_policy_app")
@app.route(route=f"{ADMIN_PREFIX}/policies/apps/{{app_id}}", methods=["GET", "PUT", "DELETE"])
async def admin_policy_app(req: Request) -> Response:
    return await gateway.admin_policies(req, "app", app_id=req.path_params["app_id"])


@app.function_name("admin_policy_user")
@app.route(route=f"{ADMIN_PREFIX}/policies/apps/{{app_id}}/users/{{user_id}}", methods=["GET", "PUT", "DELETE"])
async def admin_policy_user(req: Request) -> Response:
    return await gateway.admin_policies(req, "user", app_id=req.path_params["app_id"], user_id=req.path_params["user_id"])


@app.function_name("admin_keys")
@app.route(route=f"{ADMIN_PREFIX}/keys/apps/{{app_id}}", methods=["GET", "POST"])
async def admin_keys(req: Request) -> Response:
    return await gateway.admin_keys(req, req.path_params["app_id"])


@app.function_name("admin_key")
@app.route(route=f"{ADMIN_PREFIX}/keys/apps/{{app_id}}/{{key_id}}", methods=["DELETE"])
async def admin_key(req: Request) -> Response:
    return await gateway.admin_keys(req, req.path_params["app_id"], req.path_params["key_id"])


@app.function_name("admin_key_rotate")
@app.route(route=f"{ADMIN_PREFIX}/keys/apps/{{app_id}}/{{key_id}}/rotate", methods=["POST"])
async def admin_key_rotate(req: Request) -> Response:
    return await gateway.admin_keys(req, req.path_params["app_id"], req.path_params["key_id"], rotate=True)


@app.function_name("admin_alerts")
@app.route(route=f"{ADMIN_PREFIX}/alerts", methods=["GET"])
async def admin_alerts(req: Request) -> Response:
    return await gateway.admin_alerts(req)


@app.function_name("admin_logs_export")
@app.route(route=f"{ADMIN_PREFIX}/exports/logs", methods=["GET"])
async def admin_logs_export(req: Request) -> Response:
    return await gateway.admin_logs_export(req)


@app.function_name("admin_logs")
@app.route(route=f"{ADMIN_PREFIX}/logs", methods=["GET"])
async def admin_logs(req: Request) -> Response:
    return await gateway.admin_logs(req)


@app.function_name("admin_log")
@app.route(route=f"{ADMIN_PREFIX}/logs/{{request_id}}", methods=["GET"])
async def admin_log(req: Request) -> Response:
    return await gateway.admin_logs(req, req.path_params["request_id"])


@app.function_name("admin_usage_app")
@app.route(route=f"{ADMIN_PREFIX}/usage/apps/{{app_id}}", methods=["GET"])
async def admin_usage_app(req: Request) -> Response:
    return await gateway.admin_usage(req, req.path_params["app_id"])


@app.function_name("admin_usage_user")
@app.route(route=f"{ADMIN_PREFIX}/usage/apps/{{app_id}}/users/{{user_id}}", methods=["GET"])
async def admin_usage_user(req: Request) -> Response:
    return await gateway.admin_usage(req, req.path_params["app_id"], req.path_params["user_id"])


@app.function_name("admin_usage_app_reset")
@app.route(route=f"{ADMIN_PREFIX}/usage/apps/{{app_id}}/reset", methods=["POST"])
async def admin_usage_app_reset(req: Request) -> Response:
    return await gateway.admin_usage(req, req.path_params["app_id"], reset=True)


@app.function_name("admin_usage_user_reset")
@app.route(route=f"{ADMIN_PREFIX}/usage/apps/{{app_id}}/users/{{user_id}}/reset", methods=["POST"])
async def admin_usage_user_reset(req: Request) -> Response:
    return await gateway.admin_usage(req, req.path_params["app_id"], req.path_params["user_id"], reset=True)


@app.function_name("admin_pricing")
@app.route(route=f"{ADMIN_PREFIX}/pricing", methods=["GET"])
async def admin_pricing(req: Request) -> Response:
    return await gateway.admin_pricing(req)


@app.function_name("admin_price")
@app.route(route=f"{ADMIN_PREFIX}/pricing/{{model}}", methods=["PUT", "DELETE"])
async def admin_price(req: Request) -> Response:
    return await gateway.admin_pricing(req, req.path_params["model"])


@app.function_name("admin_cache_app")
@app.route(route=f"{ADMIN_PREFIX}/cache/apps/{{app_id}}", methods=["GET"])
async def admin_cache_app(req: Request) -> Response:
    return await gateway.admin_cache(req, req.path_params["app_id"])


@app.function_name("admin_cache_purge")
@app.route(route=f"{ADMIN_PREFIX}/cache/apps/{{app_id}}/purge", methods=["POST"])
async def admin_cache_purge(req: Request) -> Response:
    return await gateway.admin_cache(req, req.path_params["app_id"], purge=True)


@app.function_name("admin_deployments")
@app.route(route=f"{ADMIN_PREFIX}/deployments", methods=["GET"])
async def admin_deployments(req: Request) -> Response:
    return await gateway.admin_deployments(req)


@app.function_name("admin_deployment")
@app.route(route=f"{ADMIN_PREFIX}/deployments/{{name}}", methods=["GET", "PUT", "DELETE"])
async def admin_deployment(req: Request) -> Response:
    return await gateway.admin_deployments(req, req.path_params["name"])
