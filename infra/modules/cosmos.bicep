// Cosmos DB for NoSQL: the production store (shared/store/cosmos.py). Keys are disabled: the
// Function App identity (and optional operators, for the CLI) get the data-plane role
// "Cosmos DB Built-in Data Contributor". That role cannot create databases or containers, so
// all of them are created here; the adapter only reads them at start.

@description('Cosmos DB account name (3-44 lowercase letters, digits and hyphens, globally unique).')
@minLength(3)
@maxLength(44)
param name string

@description('Azure region.')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Database name (SEKISHO_COSMOS_DATABASE).')
param databaseName string

@description('serverless: pay per request unit, no throughput to manage. provisioned: autoscale throughput shared by the database.')
@allowed([
  'serverless'
  'provisioned'
])
param capacityMode string = 'serverless'

@description('provisioned only: the autoscale maximum RU/s shared by all containers.')
@minValue(1000)
param autoscaleMaxThroughput int = 1000

@description('Principal id of the Function App identity.')
param appPrincipalId string

@description('Object ids of operators (users or groups) who run `python -m shared.admin.cli` against this account.')
param operatorPrincipalIds array = []

@description('Public network access. Disabled only together with private endpoints (main.bicep enablePrivateNetworking).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

// One entry per container of shared/store/base.py CONTAINERS; tests/test_infra.py keeps the two
// equal. defaultTtl true: TTL is on with default -1, so records expire by their own `ttl` field
// and records without one never do (what the adapter asks for when it creates a container).
var containers = [
  {
    name: 'request_logs'
    partitionKey: '/app_id'
    defaultTtl: true
  }
  {
    name: 'policies'
    partitionKey: '/app_id'
    defaultTtl: false
  }
  {
    name: 'quota_counters'
    partitionKey: '/subject'
    defaultTtl: true
  }
  {
    name: 'prices'
    partitionKey: '/id'
    defaultTtl: false
  }
  {
    name: 'response_cache'
    partitionKey: '/scope'
    defaultTtl: true
  }
  {
    name: 'deployments'
    partitionKey: '/id'
    defaultTtl: false
  }
  {
    name: 'jobs'
    partitionKey: '/app_id'
    defaultTtl: true
  }
  {
    name: 'usage_rollups'
    partitionKey: '/app_id'
    defaultTtl: false
  }
  {
    name: 'admin_sessions'
    partitionKey: '/id'
    defaultTtl: true
  }
  {
    name: 'owned_objects'
    partitionKey: '/app_id'
    defaultTtl: true
  }
  {
    name: 'gateway_keys'
    partitionKey: '/id'
    defaultTtl: false
  }
  {
    name: 'budget_alerts'
    partitionKey: '/app_id'
    defaultTtl: true
  }
]

// Cosmos DB data-plane built-in role (not an Azure RBAC role): Cosmos DB Built-in Data Contributor.
var cosmosBuiltInDataContributor = '00000000-0000-0000-0000-000000000002'
var dataPlanePrincipals = union([appPrincipalId], operatorPrincipalIds)

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-05-15' = {
  name: name
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    capabilities: capacityMode == 'serverless' ? [{ name: 'EnableServerless' }] : []
    disableLocalAuth: true
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    publicNetworkAccess: publicNetworkAccess
    enableAutomaticFailover: false
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-05-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: {
      id: databaseName
    }
    options: capacityMode == 'provisioned' ? { autoscaleSettings: { maxThroughput: autoscaleMaxThroughput } } : {}
  }
}

resource sqlContainers 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-05-15' = [
  for container in containers: {
    parent: database
    name: container.name
    properties: {
      // TTL on (default -1) only for the containers whose records carry a `ttl`.
      resource: union({ id: container.name, partitionKey: { paths: [container.partitionKey], kind: 'Hash', version: 2 } }, container.defaultTtl ? { defaultTtl: -1 } : {})
    }
  }
]

resource dataContributors 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-05-15' = [
  for principalId in dataPlanePrincipals: {
    parent: account
    name: guid(account.id, principalId, cosmosBuiltInDataContributor)
    properties: {
      roleDefinitionId: '${account.id}/sqlRoleDefinitions/${cosmosBuiltInDataContributor}'
      principalId: principalId
      scope: '${account.id}/dbs/${databaseName}'
    }
    dependsOn: [
      database
    ]
  }
]

output id string = account.id
output name string = account.name
output endpoint string = account.properties.documentEndpoint
output databaseName string = database.name
