"""The Bicep in infra/ against the code: one source of truth.

There is no Bicep compiler or Azure here, so these tests stand in for what `bicep build` and a
reviewer would catch, reading the templates with tree-sitter-bicep (a syntax tree, not regexes):

- every .bicep file parses without ERROR or MISSING nodes; every name a template uses is
  declared; module calls pass exactly the parameters the module declares and read only outputs
  it has; resource types use GA API versions;
- every setting the code reads (shared/settings.py SETTINGS) is either set by the Function App's
  app settings in infra/modules/function-app.bicep or listed, with its reason, in
  infra/optional-settings.json; nothing is in both, nothing stale, no unknown names, no secrets;
- the Cosmos DB containers (names, partition keys, TTL) equal shared/store/base.py CONTAINERS,
  and the async-job queue equals shared/jobs/orchestration.py START_QUEUE;
- every role definition id in the templates is a documented built-in id (table below), the
  security defaults hold (no shared keys, no local auth, HTTPS/TLS 1.2, no FTP), and the
  workbook JSON that main.bicep loads exists and parses.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import tree_sitter
import tree_sitter_bicep

from shared.jobs.orchestration import START_QUEUE
from shared.settings import PLATFORM_SAMPLE, SETTINGS
from shared.store.base import CONTAINERS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
FUNCTION_APP = INFRA / "modules" / "function-app.bicep"
OPTIONAL_SETTINGS = INFRA / "optional-settings.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# Built-in role definitions the templates may use, by id. Verified against Microsoft's
# published built-in role definitions (Azure RBAC "built-in roles" reference; Cosmos DB for
# NoSQL "data plane built-in roles" reference). "arm" roles go in Microsoft.Authorization/
# roleAssignments; the "cosmos" role is Cosmos DB's own data-plane role (sqlRoleAssignments).
ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": ("Storage Blob Data Owner", "arm"),
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": ("Storage Queue Data Contributor", "arm"),
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": ("Storage Table Data Contributor", "arm"),
    "4633458b-17de-408a-b874-0445c86b69e6": ("Key Vault Secrets User", "arm"),
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": ("Key Vault Secrets Officer", "arm"),
    "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd": ("Cognitive Services OpenAI User", "arm"),
    "a97b65f3-24c7-4388-baec-2e87135dc908": ("Cognitive Services User", "arm"),
    "3913510d-42f4-4e42-8a64-420c390055eb": ("Monitoring Metrics Publisher", "arm"),
    "00000000-0000-0000-0000-000000000002": ("Cosmos DB Built-in Data Contributor", "cosmos"),
}
# What the Function App identity needs, whatever else is granted: host storage and Durable
# Functions (blobs, queues, tables), the store, Key Vault keys, the upstream, telemetry.
REQUIRED_ROLES = set(ROLES) - {"b86a8fe4-44ce-4948-aee5-eccb2c155cd7"}
ASSIGNMENT_TYPES = {
    "arm": "Microsoft.Authorization/roleAssignments",
    "cosmos": "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments",
}

# App settings the Functions platform reads (not Sekisho's code), allowed in the app settings.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__accountName": "host storage account, identity-based",
    "AzureWebJobsStorage__credential": "'managedidentity': use a managed identity for host storage",
    "AzureWebJobsStorage__clientId": "which user-assigned identity that is",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "where the host sends telemetry",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "telemetry sent with Entra ID as the identity",
    "PYTHON_ENABLE_INIT_INDEXING": "needed by the HTTP streaming extension on Python <= 3.12",
}
# Platform settings of local.settings.json that Flex Consumption replaces by site properties.
FLEX_REPLACED = {"FUNCTIONS_WORKER_RUNTIME": "functionAppConfig.runtime.name"}
# App settings that Flex Consumption deprecates or that mean keys in app settings.
FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE",
    "SCM_DO_BUILD_DURING_DEPLOYMENT", "ENABLE_ORYX_BUILD", "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_TIME_ZONE", "TZ", "APPINSIGHTS_INSTRUMENTATIONKEY", "AzureWebJobsStorage",
}
OPTIONAL_KINDS = {"secret", "local", "tuning"}

# Bicep functions and decorators the templates may call. A name outside these (and the
# templates' own functions) is a typo a compiler would reject; extend the set when a template
# starts using another documented function.
BICEP_FUNCTIONS = {
    "any", "array", "base64", "bool", "coalesce", "concat", "contains", "deployment", "empty",
    "endsWith", "environment", "filter", "first", "format", "guid", "int", "join", "json", "last",
    "length", "loadJsonContent", "loadTextContent", "map", "max", "min", "range", "reduce",
    "replace", "resourceGroup", "resourceId", "split", "startsWith", "string", "subscription",
    "subscriptionResourceId", "substring", "take", "tenant", "toLower", "toUpper", "trim", "union",
    "uniqueString", "uri",
}
BICEP_DECORATORS = {
    "allowed", "batchSize", "description", "export", "maxLength", "maxValue", "metadata",
    "minLength", "minValue", "secure", "sealed",
}
LOAD_TEXT_CONTENT_LIMIT = 131_072  # characters, Bicep's documented limit for loadTextContent

GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
RESOURCE_TYPE = re.compile(r"^[A-Za-z]+\.[A-Za-z]+(/[A-Za-z]+)+@(\d{4}-\d{2}-\d{2})(-preview)?$")


# --- reading Bicep with tree-sitter ------------------------------------------------------------

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))
Node = tree_sitter.Node


@dataclass(frozen=True)
class Expr:
    """A value that is not a literal (a reference, a call, an interpolated string)."""

    text: str
    node: Any = field(compare=False, repr=False)


@dataclass
class Template:
    path: Path
    root: Node
    params: dict[str, Node]  # name -> parameter_declaration
    variables: dict[str, Node]  # name -> value expression
    resources: list[Node]  # resource_declaration, nested ones included
    modules: dict[str, Node]  # name -> module_declaration
    outputs: set[str]
    types: set[str]
    functions: set[str]

    def rel(self, node: Node) -> str:
        return f"{self.path.relative_to(ROOT)}:{node.start_point[0] + 1}"


def named(node: Node) -> list[Node]:
    return [child for child in node.children if child.is_named]


def walk(node: Node):
    yield node
    for child in node.children:
        yield from walk(child)


def text(node: Node) -> str:
    return node.text.decode("utf-8")


def string_literal(node: Node) -> str | None:
    """The value of a string without interpolation, else None."""
    if node.type != "string":
        return None
    parts = named(node)
    if any(part.type != "string_content" for part in parts):
        return None
    return "".join(text(part) for part in parts).replace("\\'", "'")


def literal(node: Node, template: Template | None = None) -> Any:
    """A Python value for literals (variables resolved through `template`), Expr otherwise."""
    kind = node.type
    if kind == "string":
        value = string_literal(node)
        return Expr(text(node), node) if value is None else value
    if kind == "number":
        return int(text(node))
    if kind == "boolean":
        return text(node) == "true"
    if kind == "null":
        return None
    if kind == "array":
        return [literal(item, template) for item in named(node)]
    if kind == "object":
        return {key: literal(value, template) for key, value in object_items(node)}
    if kind == "identifier" and template is not None and text(node) in template.variables:
        return literal(template.variables[text(node)], template)
    return Expr(text(node), node)


def object_items(node: Node) -> list[tuple[str, Node]]:
    """(key, value node) of an object literal; keys with interpolation are left out."""
    items = []
    for prop in named(node):
        if prop.type != "object_property":
            continue
        parts = named(prop)
        if len(parts) < 2 or parts[0].type == "resource_declaration":
            continue
        key = text(parts[0]) if parts[0].type == "identifier" else string_literal(parts[0])
        if key is not None:
            items.append((key, parts[-1]))
    return items


def prop(node: Node, key: str) -> Node | None:
    return dict(object_items(node)).get(key)


def decl_name(node: Node) -> str:
    return next(text(child) for child in named(node) if child.type == "identifier")


def decl_type(node: Node) -> str:
    """The type string of a resource declaration, or the path of a module declaration."""
    return string_literal(next(child for child in named(node) if child.type == "string"))


@dataclass(frozen=True)
class Body:
    obj: Node  # the object literal
    loop_source: Node | None  # what a `for` iterates over
    conditional: bool


def body(decl: Node) -> Body:
    """The object of a resource or module declaration, through `for` and `if`."""
    loop_source, conditional = None, False
    node = named(decl)[-1]
    if node.type == "for_statement":
        parts = [part for part in named(node) if part.type not in ("for_loop_parameters", "comment")]
        # `for x in source: body` (x an identifier) or `for (x, i) in source: body`
        loop_source = parts[-2]
        node = parts[-1]
    if node.type == "if_statement":
        conditional = True
        node = named(node)[-1]
    assert node.type == "object", f"unexpected declaration body {node.type}"
    return Body(node, loop_source, conditional)


def param_default(decl: Node) -> Node | None:
    parts = named(decl)
    after_type = [part for part in parts[1:] if part.type != "type"]
    return after_type[-1] if after_type else None


@lru_cache(maxsize=None)
def template(path: Path) -> Template:
    root = _PARSER.parse(path.read_bytes()).root_node
    found = Template(path, root, {}, {}, [], {}, set(), set(), set())
    for node in walk(root):
        if node.type == "parameter_declaration":
            found.params[decl_name(node)] = node
        elif node.type == "variable_declaration":
            found.variables[decl_name(node)] = named(node)[-1]
        elif node.type == "resource_declaration":
            found.resources.append(node)
        elif node.type == "module_declaration":
            found.modules[decl_name(node)] = node
        elif node.type == "output_declaration":
            found.outputs.add(decl_name(node))
        elif node.type == "type_declaration":
            found.types.add(decl_name(node))
        elif node.type == "user_defined_function":
            found.functions.add(decl_name(node))
    return found


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def resources_of(type_prefix: str) -> list[tuple[Template, Node]]:
    """Resource declarations whose type starts with `type_prefix@`, in every template."""
    return [
        (found, decl)
        for found in map(template, bicep_files())
        for decl in found.resources
        if decl_type(decl).split("@")[0] == type_prefix
    ]


def the_resource(type_prefix: str, name: str | None = None) -> tuple[Template, Node]:
    matches = [
        (found, decl)
        for found, decl in resources_of(type_prefix)
        if name is None or string_literal(prop(body(decl).obj, "name")) == name
    ]
    assert len(matches) == 1, f"expected one {type_prefix} {name or ''} resource, found {len(matches)}"
    return matches[0]


def app_settings() -> dict[str, Node]:
    """Name -> value node of the Function App's app settings (Microsoft.Web/sites/config
    `appsettings`): the keys of every object literal its `properties` is built from, variables
    followed; parameters (extraAppSettings) contribute no names."""
    found, decl = the_resource("Microsoft.Web/sites/config", "appsettings")
    assert found.path == FUNCTION_APP
    settings: dict[str, Node] = {}

    def collect(node: Node) -> None:
        if node.type == "object":
            settings.update(object_items(node))
        elif node.type == "identifier" and text(node) in found.variables:
            collect(found.variables[text(node)])
        elif node.type == "call_expression":
            for argument in named(node.child_by_field_name("arguments")):
                collect(argument)
        elif node.type in ("ternary_expression", "parenthesized_expression"):
            for part in named(node)[1:] if node.type == "ternary_expression" else named(node):
                collect(part)

    collect(prop(body(decl).obj, "properties"))
    return settings


def optional_settings() -> dict[str, dict]:
    return json.loads(OPTIONAL_SETTINGS.read_text())["settings"]


# --- syntax and references -----------------------------------------------------------------------


def syntax_errors(root: Node) -> list[str]:
    problems = []
    for node in walk(root):
        where = f"line {node.start_point[0] + 1}, column {node.start_point[1] + 1}: "
        if node.type == "ERROR" or node.is_missing:
            problems.append(where + ("missing " + node.type if node.is_missing else "cannot parse " + text(node)[:60]))
        elif node.type == "parenthesized_expression" and not named(node):
            # tree-sitter-bicep 1.1 reads `[f().x]` (a call without arguments as an array
            # element) as `f` followed by `()`: assign the call to a variable first.
            problems.append(where + "empty parentheses (a call without arguments inside an array?)")
    return problems


def test_the_syntax_check_catches_broken_bicep():
    for broken in (b"resource x 'A.B/c@2024-01-01' = {", b"param a string =", b"var x = { a: }", b"var t = [\n  tenant().tenantId\n]\nvar k = 1\n"):
        assert syntax_errors(_PARSER.parse(broken).root_node), broken


def test_every_bicep_file_parses():
    files = bicep_files()
    assert INFRA / "main.bicep" in files and FUNCTION_APP in files
    problems = {
        str(path.relative_to(ROOT)): errors
        for path in files
        if (errors := syntax_errors(template(path).root))
    }
    assert not problems


def declared_names(found: Template) -> set[str]:
    names = set(found.params) | set(found.variables) | set(found.modules) | {"az", "sys"}
    names |= {decl_name(decl) for decl in found.resources}
    for node in walk(found.root):
        if node.type in ("loop_variable", "loop_enumerator"):
            names.add(text(node))
        elif node.type == "for_statement" and named(node)[0].type == "identifier":
            names.add(text(named(node)[0]))  # `for x in source`
        elif node.type == "lambda_expression":
            names.add(text(named(node)[0]))
        elif node.type == "parameter" and node.parent.parent.type == "user_defined_function":
            names.add(decl_name(node))
    return names


def undeclared_references(found: Template) -> list[str]:
    names = declared_names(found)
    problems = []
    for node in walk(found.root):
        if node.type != "identifier":
            continue
        parent, name = node.parent, text(node)
        if parent.type in (
            "parameter_declaration", "variable_declaration", "resource_declaration", "module_declaration",
            "output_declaration", "type_declaration", "user_defined_function", "parameter",
        ) and named(parent)[0] == node:
            continue  # a declaration's own name
        if parent.type == "object_property" and named(parent)[0] == node:
            continue  # an object key
        if parent.type == "for_statement" and named(parent)[0] == node:
            continue  # a loop variable
        if parent.type == "lambda_expression" and named(parent)[0] == node:
            continue  # a lambda parameter
        if parent.type == "call_expression" and parent.child_by_field_name("function") == node:
            allowed = BICEP_DECORATORS if parent.parent.type == "decorator" else BICEP_FUNCTIONS | found.functions
            if name not in allowed:
                problems.append(f"{found.rel(node)}: unknown function {name}")
            continue
        if parent.type == "type":
            if name not in found.types:
                problems.append(f"{found.rel(node)}: unknown type {name}")
            continue
        if name not in names:
            problems.append(f"{found.rel(node)}: {name} is not declared")
    return problems


def test_every_name_used_is_declared():
    problems = [problem for path in bicep_files() for problem in undeclared_references(template(path))]
    assert not problems


def test_modules_get_their_parameters_and_have_the_outputs_read():
    problems = []
    for path in bicep_files():
        found = template(path)
        for name, decl in found.modules.items():
            target_path = (path.parent / decl_type(decl)).resolve()
            if not target_path.is_file():
                problems.append(f"{found.rel(decl)}: module {name}: no file {decl_type(decl)}")
                continue
            target = template(target_path)
            params_node = prop(body(decl).obj, "params")
            given = {key for key, _ in object_items(params_node)} if params_node is not None else set()
            required = {p for p, d in target.params.items() if param_default(d) is None}
            problems += [f"{found.rel(decl)}: module {name}: {target_path.name} has no parameter {p}" for p in sorted(given - set(target.params))]
            problems += [f"{found.rel(decl)}: module {name}: required parameter {p} not given" for p in sorted(required - given)]
            for node in walk(found.root):  # <module>.outputs.<name>
                if node.type != "member_expression":
                    continue
                inner = node.child_by_field_name("object")
                if (
                    inner.type == "member_expression"
                    and text(inner.child_by_field_name("object")) == name
                    and text(inner.child_by_field_name("property")) == "outputs"
                    and text(node.child_by_field_name("property")) not in target.outputs
                ):
                    problems.append(f"{found.rel(node)}: {target_path.name} has no output {text(node.child_by_field_name('property'))}")
    assert not problems


def test_resource_types_are_full_types_with_ga_api_versions():
    problems = []
    for path in bicep_files():
        found = template(path)
        for decl in found.resources:
            match = RESOURCE_TYPE.match(decl_type(decl) or "")
            if not match:
                problems.append(f"{found.rel(decl)}: {decl_type(decl)} is not <Namespace>/<type>@<api-version>")
            elif match.group(3):
                problems.append(f"{found.rel(decl)}: {decl_type(decl)} is a preview API version")
    assert not problems


def test_parameter_files_match_their_templates():
    files = sorted(INFRA.glob("*.parameters.json"))
    assert INFRA / "main.parameters.json" in files
    for path in files:
        found = template(path.with_name(path.name.replace(".parameters.json", ".bicep")))
        given = set(json.loads(path.read_text())["parameters"])
        assert given <= set(found.params), f"{path.name} sets parameters the template does not declare"
        required = {p for p, decl in found.params.items() if param_default(decl) is None}
        assert required <= given, f"{path.name} misses required parameters {sorted(required - given)}"


# --- one source of truth: settings ---------------------------------------------------------------


def test_every_setting_the_code_reads_is_set_by_bicep_or_documented_optional():
    code = {setting.name for setting in SETTINGS}
    bicep = set(app_settings())
    optional = set(optional_settings())
    assert not sorted(code - bicep - optional), "settings neither set by infra/modules/function-app.bicep nor listed in infra/optional-settings.json"
    assert not sorted(bicep & optional), "settings both set by Bicep and listed as optional"
    assert not sorted(optional - code), "infra/optional-settings.json lists settings the code no longer reads"
    assert not sorted(bicep - code - set(PLATFORM_SETTINGS)), "Bicep sets app settings that neither the code nor the platform reads"


def test_optional_settings_say_why_and_secrets_stay_out_of_app_settings():
    entries = optional_settings()
    for name, entry in entries.items():
        assert entry.get("kind") in OPTIONAL_KINDS, name
        assert len(entry.get("reason", "")) > 20, f"{name}: say why it is not set by Bicep"
    secrets = {name for name, entry in entries.items() if entry["kind"] == "secret"}
    assert {"AZURE_OPENAI_API_KEY", "SEKISHO_COSMOS_KEY"} <= secrets
    assert not secrets & set(app_settings())
    # extraAppSettings is for tuning values: the parameters file must not smuggle secrets in.
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    extra = parameters.get("extraAppSettings", {}).get("value", {})
    assert not secrets & set(extra)


def test_platform_settings_fit_flex_consumption():
    settings = app_settings()
    for name in PLATFORM_SAMPLE:  # what local.settings.json carries beside Sekisho's own
        assert name in settings or name in FLEX_REPLACED, f"{name} is neither set nor replaced on Flex Consumption"
    assert not FORBIDDEN_SETTINGS & set(settings), "deprecated on Flex Consumption, or a key in app settings"
    assert literal(settings["PYTHON_ENABLE_INIT_INDEXING"]) == "1"
    assert literal(settings["AzureWebJobsStorage__credential"]) == "managedidentity"


def test_app_settings_point_the_gateway_at_azure_services():
    settings = app_settings()
    found = template(FUNCTION_APP)
    assert literal(settings["SEKISHO_STORE"]) == "cosmos"
    # Values that come from resources or deployment choices are parameters of the module.
    for name, param in {
        "AZURE_OPENAI_ENDPOINT": "openAiEndpoint",
        "SEKISHO_COSMOS_ENDPOINT": "cosmosEndpoint",
        "SEKISHO_COSMOS_DATABASE": "cosmosDatabaseName",
        "AZURE_CLIENT_ID": "identityClientId",
        "AzureWebJobsStorage__clientId": "identityClientId",
        "AzureWebJobsStorage__accountName": "storageAccountName",
    }.items():
        assert text(settings[name]) == param and param in found.params, name
    for name in ("SEKISHO_AUTH_TENANT_IDS", "SEKISHO_AUTH_AUDIENCES", "SEKISHO_EASY_AUTH_ENABLED"):
        assert isinstance(literal(settings[name]), Expr), f"{name} must come from deployment parameters"
    assert "gatewayAppIdUri" in text(settings["SEKISHO_AUTH_AUDIENCES"]) and "gatewayClientId" in text(settings["SEKISHO_AUTH_AUDIENCES"])


def test_main_parameter_defaults_equal_the_code_defaults():
    """Where main.bicep offers a Sekisho setting as a parameter, its default is the code's."""
    defaults = {setting.name: setting.default for setting in SETTINGS}
    main = template(INFRA / "main.bicep")
    for param, setting in {
        "quotaTimeZone": "SEKISHO_QUOTA_TIMEZONE",
        "currency": "SEKISHO_CURRENCY",
        "logContent": "SEKISHO_LOG_CONTENT",
        "requestLogRetentionDays": "SEKISHO_LOG_RETENTION_DAYS",
        "cosmosDatabaseName": "SEKISHO_COSMOS_DATABASE",
        "adminRoleName": "SEKISHO_ADMIN_ROLE",
        "allowUnregisteredApps": "SEKISHO_ALLOW_UNREGISTERED_APPS",
    }.items():
        value = literal(param_default(main.params[param]))
        value = str(value).lower() if isinstance(value, bool) else str(value)
        assert value == defaults[setting], f"main.bicep {param} = {value}, code default {setting} = {defaults[setting]}"


# --- one source of truth: containers and queues ---------------------------------------------------


def test_cosmos_containers_equal_the_store_layout():
    found, decl = the_resource("Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers")
    declared = body(decl)
    assert declared.loop_source is not None and declared.loop_source.type == "identifier", "containers come from one list"
    entries = literal(declared.loop_source, found)
    bicep = {entry["name"]: (entry["partitionKey"], entry["defaultTtl"]) for entry in entries}
    assert len(bicep) == len(entries), "a container is declared twice"
    code = {container.name: (container.partition_key, container.default_ttl) for container in CONTAINERS}
    assert bicep == code
    resource_text = text(prop(declared.obj, "properties"))
    assert "defaultTtl: -1" in resource_text and "kind: 'Hash'" in resource_text


def test_the_job_queue_exists_under_the_name_the_code_uses():
    main = template(INFRA / "main.bicep")
    _, queue_decl = the_resource("Microsoft.Storage/storageAccounts/queueServices/queues")
    assert text(body(queue_decl).loop_source) == "queueNames"
    queues = literal(prop(body(main.modules["storage"]).obj, "params"), main)["queueNames"]
    assert START_QUEUE in queues


# --- roles and security defaults -----------------------------------------------------------------


def test_role_definition_ids_are_the_documented_built_in_roles():
    used: dict[str, set[str]] = {}
    for path in bicep_files():
        found = template(path)
        for node in walk(found.root):
            value = string_literal(node) if node.type == "string" else None
            if value and GUID.match(value):
                assert value.lower() in ROLES, f"{found.rel(node)}: {value} is not a documented built-in role in ROLES"
                plane = ROLES[value.lower()][1]
                types = {decl_type(decl).split("@")[0] for decl in found.resources}
                assert ASSIGNMENT_TYPES[plane] in types, f"{found.rel(node)}: {ROLES[value.lower()][0]} is not assigned with {ASSIGNMENT_TYPES[plane]}"
                used.setdefault(value.lower(), set()).add(path.name)
    missing = REQUIRED_ROLES - set(used)
    assert not missing, f"roles never assigned: {[ROLES[role][0] for role in missing]}"


def test_no_keys_are_read_or_enabled():
    for path in bicep_files():
        found = template(path)
        calls = {
            text(node.child_by_field_name("property") or node.child_by_field_name("function"))
            for node in walk(found.root)
            if node.type in ("call_expression", "member_expression")
            and (node.child_by_field_name("property") or node.child_by_field_name("function")) is not None
        }
        assert not {name for name in calls if name.lower().startswith("list")}, f"{path.name} reads keys (list*)"
    storage = literal(prop(body(the_resource("Microsoft.Storage/storageAccounts")[1]).obj, "properties"))
    assert storage["allowSharedKeyAccess"] is False and storage["allowBlobPublicAccess"] is False
    assert storage["minimumTlsVersion"] == "TLS1_2" and storage["supportsHttpsTrafficOnly"] is True
    cosmos = literal(prop(body(the_resource("Microsoft.DocumentDB/databaseAccounts")[1]).obj, "properties"))
    assert cosmos["disableLocalAuth"] is True and cosmos["minimalTlsVersion"] == "Tls12"
    vault = literal(prop(body(the_resource("Microsoft.KeyVault/vaults")[1]).obj, "properties"))
    assert vault["enableRbacAuthorization"] is True
    accounts = resources_of("Microsoft.CognitiveServices/accounts")  # Azure OpenAI and Content Safety
    kinds = {string_literal(prop(body(decl).obj, "kind")) for _, decl in accounts}
    assert kinds == {"OpenAI", "ContentSafety"}
    for _, decl in accounts:
        assert literal(prop(body(decl).obj, "properties"))["disableLocalAuth"] is True


def test_function_app_is_flex_consumption_python_with_the_identity():
    found, plan = the_resource("Microsoft.Web/serverfarms")
    assert literal(prop(body(plan).obj, "sku")) == {"tier": "FlexConsumption", "name": "FC1"}
    _, site = the_resource("Microsoft.Web/sites")
    site_body = literal(body(site).obj, found)
    assert site_body["kind"] == "functionapp,linux"
    assert site_body["identity"]["type"] == "UserAssigned"
    properties = site_body["properties"]
    assert properties["httpsOnly"] is True
    assert properties["siteConfig"]["minTlsVersion"] == "1.2" and properties["siteConfig"]["ftpsState"] == "Disabled"
    config = properties["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.13"}
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"]["type"] == "UserAssignedIdentity"
    assert storage["authentication"]["userAssignedIdentityResourceId"] == Expr("identityId", None)
    scale = config["scaleAndConcurrency"]
    for key in ("instanceMemoryMB", "maximumInstanceCount"):
        assert isinstance(scale[key], Expr) and scale[key].text in found.params, f"{key} is a parameter"


def test_app_service_authentication_uses_the_gateway_registration():
    found, decl = the_resource("Microsoft.Web/sites/config", "authsettingsV2")
    assert body(decl).conditional, "Easy Auth is a choice (enableAppServiceAuthentication)"
    settings = literal(prop(body(decl).obj, "properties"), found)
    assert settings["platform"]["enabled"] is True
    # Whether the platform refuses anonymous calls is a parameter: by default they reach the
    # gateway, whose own 401 carries the OpenAI error body the SDKs expect.
    assert settings["globalValidation"]["requireAuthentication"] == Expr("appServiceAuthRequired", None)
    assert "'Return401'" in settings["globalValidation"]["unauthenticatedClientAction"].text
    aad = settings["identityProviders"]["azureActiveDirectory"]
    assert aad["registration"]["clientId"] == Expr("gatewayClientId", None)
    assert {item.text for item in aad["validation"]["allowedAudiences"]} == {"gatewayClientId", "gatewayAppIdUri"}


# --- workbook and docs ---------------------------------------------------------------------------


def test_loaded_files_exist_and_the_workbook_is_valid_json():
    loads = []
    for path in bicep_files():
        found = template(path)
        for node in walk(found.root):
            if node.type == "call_expression" and text(node.child_by_field_name("function")) in ("loadTextContent", "loadJsonContent"):
                argument = string_literal(named(node.child_by_field_name("arguments"))[0])
                assert argument is not None, f"{found.rel(node)}: the path must be a literal"
                loads.append(path.parent / argument)
    workbook = INFRA / "workbook" / "sekisho-usage.workbook.json"
    assert workbook in loads, "main.bicep loads the usage workbook"
    for loaded in loads:
        content = loaded.read_text(encoding="utf-8")
        assert len(content) <= LOAD_TEXT_CONTENT_LIMIT, f"{loaded.name} is over Bicep's load limit"
        if loaded.suffix == ".json":
            json.loads(content)
    data = json.loads(workbook.read_text(encoding="utf-8"))
    assert data["version"] == "Notebook/1.0" and isinstance(data["items"], list)
    _, decl = the_resource("Microsoft.Insights/workbooks")
    assert literal(prop(body(decl).obj, "kind")) == "shared"


def test_deploy_doc_covers_the_parameters_and_the_optional_settings():
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    assert "infra/optional-settings.json" in doc
    main = template(INFRA / "main.bicep")
    missing = sorted(name for name in main.params if f"`{name}`" not in doc)
    assert not missing, "docs/deploy.md does not describe these main.bicep parameters"
