// The gateway: a Python 3.13 Function App on the Flex Consumption plan, running as the
// user-assigned identity. Its app settings are the single list below; tests/test_infra.py
// checks them against shared/settings.py SETTINGS and infra/optional-settings.json.

@description('Function App name (globally unique host name).')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region.')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID and the identity-based connections).')
param identityClientId string

@description('Storage account for AzureWebJobsStorage (identity-based) and the deployment package.')
param storageAccountName string

@description('URL of the blob container that holds the deployment package.')
param deploymentContainerUrl string

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

@description('Instances kept warm for the HTTP functions (0: scale to zero, cold starts possible).')
@minValue(0)
param alwaysReadyHttpInstances int = 0

@description('Application Insights connection string.')
param appInsightsConnectionString string

@description('Send telemetry with Entra ID as the app identity (needed when Application Insights local auth is disabled).')
param appInsightsEntraAuth bool = true

@description('Upstream Azure OpenAI endpoint (AZURE_OPENAI_ENDPOINT).')
param openAiEndpoint string

@description('Azure AI Content Safety endpoint (SEKISHO_CONTENT_SAFETY_ENDPOINT); empty: none.')
param contentSafetyEndpoint string = ''

@description('Deployments the upstream serves, listed by GET /openai/v1/models (SEKISHO_DEPLOYMENTS).')
param upstreamDeployments array = []

@description('Cosmos DB account endpoint (SEKISHO_COSMOS_ENDPOINT).')
param cosmosEndpoint string

@description('Cosmos DB database (SEKISHO_COSMOS_DATABASE).')
param cosmosDatabaseName string

@description('Entra tenant ids whose tokens are accepted (SEKISHO_AUTH_TENANT_IDS).')
param allowedTenantIds array

@description('Client id of the gateway app registration.')
param gatewayClientId string

@description('App ID URI of the gateway app registration, e.g. api://<client id>.')
param gatewayAppIdUri string

@description('App role that unlocks the admin API (SEKISHO_ADMIN_ROLE).')
param adminRoleName string

@description('Serve apps that have no policy with the default policy (SEKISHO_ALLOW_UNREGISTERED_APPS).')
param allowUnregisteredApps bool

@description('Time zone of quota windows (SEKISHO_QUOTA_TIMEZONE).')
param quotaTimeZone string

@description('Currency of prices and budgets (SEKISHO_CURRENCY).')
param currency string

@description('Content kept in request logs: full, redacted or metadata (SEKISHO_LOG_CONTENT).')
param logContent string

@description('Request log retention in days (SEKISHO_LOG_RETENTION_DAYS).')
param requestLogRetentionDays int

@description('Turn on App Service Authentication (Easy Auth) in front of the app, with the gateway app registration.')
param enableAppServiceAuthentication bool = false

@description('With Easy Auth on: refuse unauthenticated calls at the platform (401 without the OpenAI error body) instead of passing them to the gateway, which validates tokens itself.')
param appServiceAuthRequired bool = false

@description('Let the gateway trust X-MS-CLIENT-PRINCIPAL (SEKISHO_EASY_AUTH_ENABLED). Only with enableAppServiceAuthentication, and only once verified on the deployed app (docs/deploy.md).')
param trustEasyAuthPrincipal bool = false

@description('Public network access to the gateway endpoint itself.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Subnet (delegated to Microsoft.App/environments) for outbound VNet integration; empty for none.')
param virtualNetworkSubnetId string = ''

@description('More app settings, e.g. tuning values listed in infra/optional-settings.json. Never secrets.')
param extraAppSettings object = {}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  // azd (azure.yaml service "gateway") finds the app to deploy to by this tag.
  tags: union(tags, { 'azd-service-name': 'gateway' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: publicNetworkAccess
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        alwaysReady: alwaysReadyHttpInstances > 0 ? [{ name: 'http', instanceCount: alwaysReadyHttpInstances }] : []
      }
      runtime: {
        name: 'python'
        version: '3.13'
      }
    }
  }
}

// Every setting the code reads is either here or listed in infra/optional-settings.json.
// No keys: storage, Cosmos DB, Azure OpenAI, Key Vault and telemetry all use the identity.
var appSettings = {
  // Functions host storage, identity-based (the account allows no shared keys).
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  // The HTTP streaming extension needs it on Python <= 3.12.
  PYTHON_ENABLE_INIT_INDEXING: '1'
  // azure-identity's DefaultAzureCredential picks the user-assigned identity by this.
  AZURE_CLIENT_ID: identityClientId
  AZURE_OPENAI_ENDPOINT: openAiEndpoint
  SEKISHO_DEPLOYMENTS: join(upstreamDeployments, ',')
  SEKISHO_CONTENT_SAFETY_ENDPOINT: contentSafetyEndpoint
  SEKISHO_STORE: 'cosmos'
  SEKISHO_COSMOS_ENDPOINT: cosmosEndpoint
  SEKISHO_COSMOS_DATABASE: cosmosDatabaseName
  SEKISHO_AUTH_TENANT_IDS: join(allowedTenantIds, ',')
  SEKISHO_AUTH_AUDIENCES: join([gatewayClientId, gatewayAppIdUri], ',')
  SEKISHO_EASY_AUTH_ENABLED: enableAppServiceAuthentication && trustEasyAuthPrincipal ? 'true' : 'false'
  SEKISHO_ADMIN_ROLE: adminRoleName
  SEKISHO_ALLOW_UNREGISTERED_APPS: allowUnregisteredApps ? 'true' : 'false'
  SEKISHO_QUOTA_TIMEZONE: quotaTimeZone
  SEKISHO_CURRENCY: currency
  SEKISHO_LOG_CONTENT: logContent
  SEKISHO_LOG_RETENTION_DAYS: string(requestLogRetentionDays)
}

var appInsightsAuthSettings = appInsightsEntraAuth ? { APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD' } : {}

resource siteAppSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: union(appSettings, appInsightsAuthSettings, extraAppSettings)
}

// App Service Authentication (Easy Auth): browser sign-in for the admin page and a second token
// check in front of the gateway, which validates every bearer token itself either way
// (docs/deploy.md: Easy Auth on Flex Consumption).
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = if (enableAppServiceAuthentication) {
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      // Default: anonymous calls reach the gateway, which answers 401 invalid_token in the
      // OpenAI error shape; the platform still validates tokens it is sent and offers browser
      // sign-in (/.auth/login/aad) for the admin page.
      requireAuthentication: appServiceAuthRequired
      unauthenticatedClientAction: appServiceAuthRequired ? 'Return401' : 'AllowAnonymous'
      excludedPaths: [
        '/health'
      ]
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: gatewayClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            gatewayAppIdUri
            gatewayClientId
          ]
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
  }
  dependsOn: [
    siteAppSettings
  ]
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
