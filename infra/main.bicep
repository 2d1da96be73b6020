// Sekisho: the whole stack in one resource group.
//
//   az deployment group create -g <rg> -f infra/main.bicep -p infra/main.parameters.json \
//     -p gatewayClientId=<gateway app registration client id>
//
// Function App (Flex Consumption, Python 3.13) running as a user-assigned identity; its storage
// account (identity-based host storage, deployment container, Durable Functions); Cosmos DB for
// NoSQL with every container of the code; Key Vault; Log Analytics, Application Insights and the
// usage workbook; optionally Azure OpenAI with model deployments and a private network.
// No keys anywhere: every data-plane grant goes to the identity. docs/deploy.md walks through it.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Naming and placement

@description('Azure region of the resources (Flex Consumption must be offered there).')
param location string = resourceGroup().location

@description('Short prefix of resource names: 3-10 lowercase letters or digits.')
@minLength(3)
@maxLength(10)
param namePrefix string = 'sekisho'

@description('Suffix that makes global names unique; stable for a resource group.')
@minLength(5)
@maxLength(13)
param resourceToken string = toLower(uniqueString(subscription().id, resourceGroup().id))

@description('Tags for every resource.')
param tags object = {}

// ---------------------------------------------------------------------------------------------
// Identity of the gateway (the Entra app registration callers get tokens for)

@description('Client id of the gateway app registration (docs/deploy.md, step 1).')
@minLength(36)
@maxLength(36)
param gatewayClientId string

@description('App ID URI of the gateway app registration; empty: api://<gatewayClientId>.')
param gatewayAppIdUri string = ''

@description('Entra tenant ids whose tokens are accepted; empty: this deployment\'s tenant.')
param allowedTenantIds array = []

@description('App role that unlocks the admin API; must match the app registration.')
param adminRoleName string = 'Sekisho.Admin'

@description('App Service Authentication (Easy Auth) in front of the gateway. Off by default: the gateway validates tokens itself.')
param enableAppServiceAuthentication bool = false

@description('With Easy Auth on: the platform refuses unauthenticated calls (plain 401) before the gateway sees them.')
param appServiceAuthRequired bool = false

@description('Trust the X-MS-CLIENT-PRINCIPAL header from Easy Auth. Only after verifying on the deployed app that Easy Auth rejects unauthenticated calls (docs/deploy.md).')
param trustEasyAuthPrincipal bool = false

@description('Object ids of operators (users or groups): Cosmos DB data access for the CLI, Key Vault secrets officer.')
param operatorPrincipalIds array = []

// ---------------------------------------------------------------------------------------------
// Function App (Flex Consumption)

@description('Memory of each instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Most instances the app scales out to.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Instances kept warm for HTTP (0: scale to zero).')
@minValue(0)
param alwaysReadyHttpInstances int = 0

@description('Public network access to the gateway endpoint.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Private endpoints for storage, Cosmos DB, Key Vault (and Azure OpenAI) and VNet integration for the app; their public access is then off.')
param enablePrivateNetworking bool = false

@description('Extra app settings (tuning values from infra/optional-settings.json). Never secrets.')
param extraAppSettings object = {}

// ---------------------------------------------------------------------------------------------
// Gateway behaviour (Sekisho settings whose production value is a deployment choice)

@description('Serve apps that have no policy with the default policy (SEKISHO_ALLOW_UNREGISTERED_APPS).')
param allowUnregisteredApps bool = false

@description('IANA time zone of quota windows, e.g. Asia/Tokyo (SEKISHO_QUOTA_TIMEZONE).')
param quotaTimeZone string = 'UTC'

@description('Currency of prices and budgets (SEKISHO_CURRENCY).')
param currency string = 'USD'

@description('Content kept in request logs (SEKISHO_LOG_CONTENT).')
@allowed([
  'full'
  'redacted'
  'metadata'
])
param logContent string = 'full'

@description('Request log retention in days (SEKISHO_LOG_RETENTION_DAYS).')
@minValue(1)
param requestLogRetentionDays int = 30

// ---------------------------------------------------------------------------------------------
// Data

@description('Redundancy of the Function App storage account.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Cosmos DB capacity: serverless, or provisioned autoscale throughput shared by the database.')
@allowed([
  'serverless'
  'provisioned'
])
param cosmosCapacityMode string = 'serverless'

@description('provisioned only: autoscale maximum RU/s of the database.')
@minValue(1000)
param cosmosAutoscaleMaxThroughput int = 1000

@description('Cosmos DB database name (SEKISHO_COSMOS_DATABASE).')
param cosmosDatabaseName string = 'sekisho'

@description('Key Vault purge protection (cannot be turned off once on).')
param keyVaultPurgeProtection bool = true

@description('Days Log Analytics keeps logs.')
@minValue(30)
@maxValue(730)
param logAnalyticsRetentionDays int = 30

@description('Email addresses that receive budget alerts (an action group, and alert rules over the usage telemetry).')
param alertEmails array = []

@description('A webhook (e.g. a Teams workflow) that receives budget alerts in the common alert schema.')
param alertWebhookUri string = ''

@description('Application Insights accepts telemetry only with Entra ID.')
param appInsightsDisableLocalAuth bool = true

@description('Display name of the usage workbook.')
param workbookDisplayName string = 'Sekisho usage'

// ---------------------------------------------------------------------------------------------
// Upstream Azure OpenAI

@description('Create an Azure OpenAI account with model deployments; false: use existingOpenAiEndpoint.')
param deployOpenAi bool = true

@description('Region of the Azure OpenAI account (models differ by region).')
param openAiLocation string = location

@description('Model deployments to create: name (what callers send as model/deployment), model, version, sku, capacity (thousands of tokens per minute).')
param openAiDeployments modelDeployment[] = [
  {
    name: 'gpt-4o-mini'
    model: 'gpt-4o-mini'
    version: '2024-07-18'
    sku: 'GlobalStandard'
    capacity: 50
  }
  {
    name: 'text-embedding-3-small'
    model: 'text-embedding-3-small'
    version: '1'
    sku: 'Standard'
    capacity: 50
  }
]

@description('deployOpenAi false: endpoint of an existing Azure OpenAI resource, e.g. https://<name>.openai.azure.com (grant the identity "Cognitive Services OpenAI User" on it).')
param existingOpenAiEndpoint string = ''

@description('deployOpenAi false: deployment names that endpoint serves (SEKISHO_DEPLOYMENTS).')
param existingOpenAiDeployments array = []

// ---------------------------------------------------------------------------------------------
// Azure AI Content Safety (for apps whose policy turns content_safety on)

@description('Create an Azure AI Content Safety account (local auth off; the identity gets Cognitive Services User); false: use existingContentSafetyEndpoint, or none.')
param deployContentSafety bool = true

@description('Region of the Content Safety account (Prompt Shields is not offered in every region).')
param contentSafetyLocation string = location

@description('deployContentSafety false: endpoint of an existing Content Safety resource (grant the identity "Cognitive Services User" on it); empty: none, and apps that turn content_safety on follow their on_failure.')
param existingContentSafetyEndpoint string = ''

type modelDeployment = {
  name: string
  model: string
  version: string
  sku: string
  capacity: int
}

// ---------------------------------------------------------------------------------------------

var names = {
  identity: 'id-${namePrefix}-${resourceToken}'
  storage: take('st${namePrefix}${resourceToken}', 24)
  cosmos: 'cosmos-${namePrefix}-${resourceToken}'
  keyVault: 'kv-${take(namePrefix, 7)}-${resourceToken}'
  logAnalytics: 'log-${namePrefix}-${resourceToken}'
  appInsights: 'appi-${namePrefix}-${resourceToken}'
  openAi: 'oai-${namePrefix}-${resourceToken}'
  contentSafety: 'cs-${namePrefix}-${resourceToken}'
  plan: 'plan-${namePrefix}-${resourceToken}'
  functionApp: 'func-${namePrefix}-${resourceToken}'
  vnet: 'vnet-${namePrefix}-${resourceToken}'
}
var deploymentContainerName = 'deployment-package'
// The async-job start queue: shared/jobs/orchestration.py START_QUEUE (checked by tests/test_infra.py).
var jobQueueName = 'sekisho-jobs'
var dataPublicNetworkAccess = enablePrivateNetworking ? 'Disabled' : 'Enabled'
var homeTenantId = tenant().tenantId

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: names.identity
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: names.storage
    location: location
    tags: tags
    skuName: storageSkuName
    deploymentContainerName: deploymentContainerName
    queueNames: [
      jobQueueName
    ]
    principalId: identity.outputs.principalId
    publicNetworkAccess: dataPublicNetworkAccess
  }
}

module cosmos 'modules/cosmos.bicep' = {
  name: 'cosmos'
  params: {
    name: names.cosmos
    location: location
    tags: tags
    databaseName: cosmosDatabaseName
    capacityMode: cosmosCapacityMode
    autoscaleMaxThroughput: cosmosAutoscaleMaxThroughput
    appPrincipalId: identity.outputs.principalId
    operatorPrincipalIds: operatorPrincipalIds
    publicNetworkAccess: dataPublicNetworkAccess
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: names.keyVault
    location: location
    tags: tags
    appPrincipalId: identity.outputs.principalId
    operatorPrincipalIds: operatorPrincipalIds
    enablePurgeProtection: keyVaultPurgeProtection
    publicNetworkAccess: dataPublicNetworkAccess
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: names.logAnalytics
    appInsightsName: names.appInsights
    location: location
    tags: tags
    retentionInDays: logAnalyticsRetentionDays
    disableLocalAuth: appInsightsDisableLocalAuth
    appPrincipalId: identity.outputs.principalId
    alertEmails: alertEmails
    alertWebhookUri: alertWebhookUri
  }
}

module openAi 'modules/openai.bicep' = if (deployOpenAi) {
  name: 'openai'
  params: {
    name: names.openAi
    location: openAiLocation
    tags: tags
    deployments: openAiDeployments
    appPrincipalId: identity.outputs.principalId
    publicNetworkAccess: dataPublicNetworkAccess
  }
}

module contentSafety 'modules/content-safety.bicep' = if (deployContentSafety) {
  name: 'content-safety'
  params: {
    name: names.contentSafety
    location: contentSafetyLocation
    tags: tags
    appPrincipalId: identity.outputs.principalId
    publicNetworkAccess: dataPublicNetworkAccess
  }
}

module network 'modules/network.bicep' = if (enablePrivateNetworking) {
  name: 'network'
  params: {
    name: names.vnet
    location: location
    tags: tags
    storageAccountId: storage.outputs.id
    cosmosAccountId: cosmos.outputs.id
    keyVaultId: keyVault.outputs.id
    openAiAccountId: deployOpenAi ? openAi.outputs.id : ''
    contentSafetyAccountId: deployContentSafety ? contentSafety.outputs.id : ''
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  params: {
    name: names.functionApp
    planName: names.plan
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    alwaysReadyHttpInstances: alwaysReadyHttpInstances
    appInsightsConnectionString: monitoring.outputs.connectionString
    appInsightsEntraAuth: appInsightsDisableLocalAuth
    openAiEndpoint: deployOpenAi ? openAi.outputs.endpoint : existingOpenAiEndpoint
    contentSafetyEndpoint: deployContentSafety ? contentSafety.outputs.endpoint : existingContentSafetyEndpoint
    upstreamDeployments: deployOpenAi ? map(openAiDeployments, model => model.name) : existingOpenAiDeployments
    cosmosEndpoint: cosmos.outputs.endpoint
    cosmosDatabaseName: cosmos.outputs.databaseName
    allowedTenantIds: empty(allowedTenantIds) ? [homeTenantId] : allowedTenantIds
    gatewayClientId: gatewayClientId
    gatewayAppIdUri: empty(gatewayAppIdUri) ? 'api://${gatewayClientId}' : gatewayAppIdUri
    adminRoleName: adminRoleName
    allowUnregisteredApps: allowUnregisteredApps
    quotaTimeZone: quotaTimeZone
    currency: currency
    logContent: logContent
    requestLogRetentionDays: requestLogRetentionDays
    enableAppServiceAuthentication: enableAppServiceAuthentication
    appServiceAuthRequired: appServiceAuthRequired
    trustEasyAuthPrincipal: trustEasyAuthPrincipal
    publicNetworkAccess: publicNetworkAccess
    virtualNetworkSubnetId: enablePrivateNetworking ? network.outputs.appSubnetId : ''
    extraAppSettings: extraAppSettings
  }
}

// Usage views for admins; the workbook reads the usage events the gateway sends to Application Insights.
resource usageWorkbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, 'sekisho-usage-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: workbookDisplayName
    category: 'workbook'
    sourceId: monitoring.outputs.appInsightsId
    version: 'Notebook/1.0'
    serializedData: loadTextContent('workbook/sekisho-usage.workbook.json')
  }
}

output functionAppName string = functionApp.outputs.name
output gatewayUrl string = 'https://${functionApp.outputs.defaultHostName}'
output identityClientId string = identity.outputs.clientId
output identityPrincipalId string = identity.outputs.principalId
output storageAccountName string = storage.outputs.name
output cosmosAccountName string = cosmos.outputs.name
output cosmosEndpoint string = cosmos.outputs.endpoint
output cosmosDatabaseName string = cosmos.outputs.databaseName
output keyVaultName string = keyVault.outputs.name
output keyVaultUri string = keyVault.outputs.uri
output appInsightsName string = monitoring.outputs.appInsightsName
output openAiEndpoint string = deployOpenAi ? openAi.outputs.endpoint : existingOpenAiEndpoint
output workbookId string = usageWorkbook.id
