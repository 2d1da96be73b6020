// Log Analytics workspace and workspace-based Application Insights. With local auth disabled,
// telemetry is accepted only from Entra ID: the Functions host sends it as the Function App
// identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING), which holds "Monitoring Metrics Publisher".

@description('Log Analytics workspace name.')
param logAnalyticsName string

@description('Application Insights component name.')
param appInsightsName string

@description('Azure region.')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Days the workspace keeps logs (usage events, traces).')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

@description('Accept telemetry only with Entra ID (no instrumentation-key ingestion).')
param disableLocalAuth bool = true

@description('Principal id of the Function App identity (Monitoring Metrics Publisher).')
param appPrincipalId string

// Built-in Azure role (id checked in tests/test_infra.py).
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

resource workspace 'Microsoft.OperationalInsights/workspaces@2025-07-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: disableLocalAuth
  }
}

resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, appPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output workspaceId string = workspace.id
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
