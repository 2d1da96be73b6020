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

@description('Email addresses that receive budget alerts (the action group); empty, and no webhook: no action group or alert rules.')
param alertEmails array = []

@description('A webhook (a Teams workflow, an incident tool) that receives budget alerts in the common alert schema; empty: none.')
param alertWebhookUri string = ''

@description('Short name of the action group (its notifications show it): up to 12 characters.')
@maxLength(12)
param alertGroupShortName string = 'sekisho'

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

// Budget alerts. The gateway emits one `sekisho.budget_alert` event per threshold crossed per
// window (shared/quota/alerts.py: exactly one across instances); the first rule turns each into a
// notification of the action group, the second tells of requests the budgets refused. Field
// names are the telemetry's (shared/records/telemetry.py); tests/test_budget_alerts.py holds the
// queries to them.
var deployAlerts = !empty(alertEmails) || !empty(alertWebhookUri)

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (deployAlerts) {
  name: '${appInsightsName}-budgets'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: alertGroupShortName
    enabled: true
    emailReceivers: [
      for (address, i) in alertEmails: {
        name: 'email-${i}'
        emailAddress: address
        useCommonAlertSchema: true
      }
    ]
    webhookReceivers: empty(alertWebhookUri) ? [] : [
      {
        name: 'webhook'
        serviceUri: alertWebhookUri
        useCommonAlertSchema: true
      }
    ]
  }
}

resource budgetThresholdRule 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = if (deployAlerts) {
  name: '${appInsightsName}-budget-threshold'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Sekisho: a budget crossed a threshold'
    description: 'An app or one of its users reached a share (per cent) of its tokens_per_day or spend_per_month. One event per threshold per window.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: '''
traces
| where message == "sekisho.budget_alert"
| extend app_id = tostring(customDimensions.app_id), user_id = tostring(customDimensions.user_id), metric = tostring(customDimensions.metric), threshold_percent = tostring(customDimensions.threshold_percent), window = tostring(customDimensions.window)
| project timestamp, app_id, user_id, metric, threshold_percent, window
'''
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'app_id'
              operator: 'Include'
              values: [
                '*'
              ]
            }
            {
              name: 'metric'
              operator: 'Include'
              values: [
                '*'
              ]
            }
            {
              name: 'threshold_percent'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource budgetRefusalRule 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = if (deployAlerts) {
  name: '${appInsightsName}-budget-refusals'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Sekisho: budgets are refusing requests'
    description: 'Requests answered 429 insufficient_quota (a daily token or monthly spend budget is used up), per app, in the last 15 minutes.'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: '''
traces
| where message == "sekisho.request"
| where tostring(customDimensions.error_code) == "insufficient_quota"
| extend app_id = tostring(customDimensions.app_id)
| project timestamp, app_id
'''
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'app_id'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = deployAlerts ? actionGroup.id : ''
output workspaceId string = workspace.id
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
