"""Every resource in infra/ checked against Azure's resource definitions, offline.

The definitions are the models the Azure SDK for Python generates from the same REST API
specifications the Bicep compiler's types come from (the azure-mgmt-* packages pinned in
requirements-dev.txt, one per provider, for exactly the API versions the templates use). A
resource type or API version without definitions fails, as does a property its type does not
have (a misspelling, a property of another API version) and a read-only property a template
sets. Property paths are checked inside object literals, through arrays, maps, nested models
both branches of a condition and the objects a union() merges; values that are expressions are not evaluated, and enum
values are not checked (the models type them as strings). The tree-sitter parse of
tests/test_infra.py reads the templates.
"""
from __future__ import annotations

import importlib
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from .test_infra import INFRA, Node, body, bicep_files, decl_type, named, object_items, string_literal, template

# type@version -> (models module, model class; or, for sites/config, the class by config name)
DEFINITIONS: dict[str, tuple[str, str | dict[str, str]]] = {
    "Microsoft.Authorization/roleAssignments@2022-04-01": ("azure.mgmt.authorization.v2022_04_01.models", "RoleAssignmentCreateParameters"),
    "Microsoft.Web/serverfarms@2024-04-01": ("azure.mgmt.web.v2024_04_01.models", "AppServicePlan"),
    "Microsoft.Web/sites@2024-04-01": ("azure.mgmt.web.v2024_04_01.models", "Site"),
    "Microsoft.Web/sites/config@2024-04-01": ("azure.mgmt.web.v2024_04_01.models",
                                              {"appsettings": "StringDictionary", "authsettingsV2": "SiteAuthSettingsV2", "web": "SiteConfigResource"}),
    "Microsoft.CognitiveServices/accounts@2024-10-01": ("azure.mgmt.cognitiveservices.models", "Account"),
    "Microsoft.CognitiveServices/accounts/deployments@2024-10-01": ("azure.mgmt.cognitiveservices.models", "Deployment"),
    "Microsoft.Storage/storageAccounts@2023-05-01": ("azure.mgmt.storage.v2023_05_01.models", "StorageAccountCreateParameters"),
    "Microsoft.Storage/storageAccounts/blobServices@2023-05-01": ("azure.mgmt.storage.v2023_05_01.models", "BlobServiceProperties"),
    "Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01": ("azure.mgmt.storage.v2023_05_01.models", "BlobContainer"),
    "Microsoft.Storage/storageAccounts/queueServices@2023-05-01": ("azure.mgmt.storage.v2023_05_01.models", "QueueServiceProperties"),
    "Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01": ("azure.mgmt.storage.v2023_05_01.models", "StorageQueue"),
    "Microsoft.Resources/resourceGroups@2024-07-01": ("azure.mgmt.resource.resources.v2024_07_01.models", "ResourceGroup"),
    "Microsoft.OperationalInsights/workspaces@2025-07-01": ("azure.mgmt.loganalytics.models", "Workspace"),
    "Microsoft.Insights/components@2020-02-02": ("azure.mgmt.applicationinsights.v2020_02_02.models", "ApplicationInsightsComponent"),
    "Microsoft.Insights/workbooks@2023-06-01": ("azure.mgmt.applicationinsights.v2023_06_01.models", "Workbook"),
    "Microsoft.Insights/actionGroups@2023-01-01": ("azure.mgmt.monitor.models", "ActionGroupResource"),
    "Microsoft.Insights/scheduledQueryRules@2023-12-01": ("azure.mgmt.monitor.models", "ScheduledQueryRuleResource"),
    "Microsoft.Network/virtualNetworks@2024-01-01": ("azure.mgmt.network.models", "VirtualNetwork"),
    "Microsoft.Network/privateEndpoints@2024-01-01": ("azure.mgmt.network.models", "PrivateEndpoint"),
    "Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-01-01": ("azure.mgmt.network.models", "PrivateDnsZoneGroup"),
    "Microsoft.Network/privateDnsZones@2020-06-01": ("azure.mgmt.privatedns.models", "PrivateZone"),
    "Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01": ("azure.mgmt.privatedns.models", "VirtualNetworkLink"),
    "Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31": ("azure.mgmt.msi.v2023_01_31.models", "Identity"),
    "Microsoft.KeyVault/vaults@2023-07-01": ("azure.mgmt.keyvault.v2023_07_01.models", "VaultCreateOrUpdateParameters"),
    "Microsoft.DocumentDB/databaseAccounts@2024-05-15": ("azure.mgmt.cosmosdb.models", "DatabaseAccountCreateUpdateParameters"),
    "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-05-15": ("azure.mgmt.cosmosdb.models", "SqlRoleAssignmentCreateUpdateParameters"),
    "Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-05-15": ("azure.mgmt.cosmosdb.models", "SqlDatabaseCreateUpdateParameters"),
    "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-05-15": ("azure.mgmt.cosmosdb.models", "SqlContainerCreateUpdateParameters"),
}
# Packages that carry one API version (per resource type), not a folder per version: the versions they send.
SINGLE_VERSION = {"azure.mgmt.cognitiveservices": ("2024-10-01",), "azure.mgmt.loganalytics": ("2025-07-01",),
                  "azure.mgmt.network": ("2024-01-01",), "azure.mgmt.privatedns": ("2020-06-01",), "azure.mgmt.cosmosdb": ("2024-05-15",),
                  "azure.mgmt.monitor": ("2023-01-01", "2023-12-01")}  # action groups, scheduled query rules
# Keys of a declaration that are Bicep's, not the resource's.
DECLARATION_KEYS = {"name", "parent", "scope", "dependsOn"}
_LEAVES = {"str", "int", "long", "float", "bool", "object", "iso-8601", "rfc-1123", "duration", "date", "bytearray", "base64", "unix-time", "decimal"}


@lru_cache(maxsize=None)
def _module(name: str):
    return importlib.import_module(name)


@lru_cache(maxsize=None)
def schema_of(module: str, class_name: str) -> dict[str, Any]:
    """JSON key -> (type, read-only), or a dict for a level the model flattens (`properties.x`)."""
    cls = getattr(_module(module), class_name)
    tree: dict[str, Any] = {}
    validation = getattr(cls, "_validation", {}) or {}
    for python_name, info in cls._attribute_map.items():
        parts = [p.replace("\\.", ".") for p in _split_key(info["key"])]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = (info["type"], bool(validation.get(python_name, {}).get("readonly")))
    return tree


def _split_key(key: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in key:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped, current = True, current + "\\"
        elif char == ".":
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _branches(node: Node) -> list[Node]:
    """The literal values a value node can be: itself, both branches of `c ? a : b`, or each
    object `union(a, b, …)` merges."""
    if node.type == "ternary_expression":
        return [branch for child in named(node)[1:] for branch in _branches(child)]
    if node.type == "call_expression" and named(node) and named(node)[0].text == b"union":
        arguments = [child for part in named(node)[1:] for child in (named(part) if part.type == "arguments" else [part])]
        return [branch for argument in arguments for branch in _branches(argument)]
    if node.type == "parenthesized_expression":
        return [branch for child in named(node) for branch in _branches(child)]
    return [node]


CHECKED: list[str] = []  # every property path checked (the test shows the check reaches deep)


def check_object(module: str, obj: Node, tree: dict[str, Any], path: str, problems: list[str], where: str, top: bool = False) -> None:
    for key, value in object_items(obj):
        CHECKED.append(f"{where.split(' ', 1)[-1]} {path}{key}")
        if top and key in DECLARATION_KEYS:
            continue
        if key not in tree:
            near = [k for k in tree if k.lower() == key.lower()]
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"{where}: {path}{key} is not a property of this type{hint}")
            continue
        entry = tree[key]
        if isinstance(entry, dict):
            for branch in _branches(value):
                if branch.type == "object":
                    check_object(module, branch, entry, f"{path}{key}.", problems, where)
            continue
        kind, read_only = entry
        if read_only:
            problems.append(f"{where}: {path}{key} is read-only")
        for branch in _branches(value):
            check_value(module, branch, kind, f"{path}{key}", problems, where)


def check_value(module: str, value: Node, kind: str, path: str, problems: list[str], where: str) -> None:
    if kind.startswith("[") and kind.endswith("]"):
        if value.type == "array":
            for item in named(value):
                for branch in _branches(item):
                    check_value(module, branch, kind[1:-1], f"{path}[]", problems, where)
        return
    if kind.startswith("{") and kind.endswith("}"):
        if value.type == "object":
            for key, item in object_items(value):
                for branch in _branches(item):
                    check_value(module, branch, kind[1:-1], f"{path}.{key}", problems, where)
        return
    if kind in _LEAVES:
        if value.type in ("object", "array") and kind != "object":
            problems.append(f"{where}: {path} is a {kind}, not an {value.type}")
        return
    if value.type == "object" and hasattr(_module(module), kind):
        check_object(module, value, schema_of(module, kind), f"{path}.", problems, where)


def check_templates(paths: list[Path]) -> list[str]:
    problems: list[str] = []
    for path in paths:
        found = template(path)
        for decl in found.resources:
            resource_type = decl_type(decl)
            where = f"{path.relative_to(path.parents[1]) if path.parent.name == 'modules' else path.name}:{decl.start_point[0] + 1}"
            if resource_type is None:
                problems.append(f"{where}: the resource type is not a plain string")
                continue
            if resource_type not in DEFINITIONS:
                problems.append(f"{where}: no Azure definitions for {resource_type} (unknown type or API version)")
                continue
            if any(child.type == "existing" or child.text == b"existing" for child in decl.children):
                continue  # a reference to a resource made elsewhere: only its name is given
            module, model = DEFINITIONS[resource_type]
            obj = body(decl).obj
            if isinstance(model, dict):
                config = string_literal(dict(object_items(obj)).get("name")) if dict(object_items(obj)).get("name") else None
                if config not in model:
                    problems.append(f"{where}: no definitions for the config named {config!r}")
                    continue
                model = model[config]
            check_object(module, obj, schema_of(module, model), "", problems, f"{where} {resource_type}", top=True)
    return problems


def test_the_definitions_are_for_exactly_these_api_versions():
    for resource_type, (module, _) in DEFINITIONS.items():
        version = resource_type.split("@")[1]
        package = ".".join(module.split(".")[:3])
        if package in SINGLE_VERSION:
            assert version in SINGLE_VERSION[package], resource_type
            sources = Path(_module(package).__file__).parent.rglob("*.py")
            assert any(f'"{version}"' in source.read_text(encoding="utf-8") for source in sources), f"{package} does not send {version}"
        else:
            assert f"v{version.replace('-', '_')}" in module, f"{resource_type}: {module} is another API version"
        _module(module)  # installed (requirements-dev.txt)


def test_every_resource_property_is_in_azures_definitions():
    CHECKED.clear()
    problems = check_templates(bicep_files())
    assert not problems, "\n".join(problems)
    # The check reaches into nested models, flattened levels, arrays and conditions.
    for deep in ("Microsoft.Web/sites@2024-04-01 properties.functionAppConfig.scaleAndConcurrency.instanceMemoryMB",
                 "Microsoft.Web/sites/config@2024-04-01 properties.identityProviders.azureActiveDirectory.registration.clientId",
                 "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-05-15 properties.resource.partitionKey.paths",
                 "Microsoft.Storage/storageAccounts@2023-05-01 properties.networkAcls.defaultAction",
                 "Microsoft.Network/virtualNetworks@2024-01-01 properties.subnets[].properties.delegations[].properties.serviceName"):
        assert deep in CHECKED, deep
    assert len(CHECKED) > 150


@pytest.mark.parametrize("change, expected", [
    (("disableLocalAuth: true", "disableLocalAuths: true"), "properties.disableLocalAuths is not a property"),
    (("customSubDomainName: name", "customSubdomainName: name"), "did you mean customSubDomainName?"),
    (("accounts@2024-10-01' = {\n  name: name\n  location", "accounts@2024-10-02' = {\n  name: name\n  location"), "no Azure definitions for Microsoft.CognitiveServices/accounts@2024-10-02"),
    (("kind: 'ContentSafety'", "kind: 'ContentSafety'\n  properties2: {}"), "properties2 is not a property"),
    (("customSubDomainName: name", "customSubDomainName: name\n    endpoint: 'https://x'"), "properties.endpoint is read-only"),
])
def test_a_broken_template_is_caught(tmp_path, change, expected):
    """The check in a scratch copy of the templates with one thing broken."""
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    target = copy / "modules" / "content-safety.bicep"
    original, broken = change
    text = target.read_text()
    assert original in text
    target.write_text(text.replace(original, broken, 1))
    problems = check_templates([target])
    assert any(expected in problem for problem in problems), problems
