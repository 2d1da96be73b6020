// Optional Azure OpenAI account with model deployments (main.bicep deployOpenAi). Local (key)
// auth is off: the gateway calls it with the Function App identity, which holds
// "Cognitive Services OpenAI User" on the account.

@description('Account name; also its custom subdomain (<name>.openai.azure.com), globally unique.')
@minLength(2)
@maxLength(64)
param name string

@description('Azure region of the account (model availability differs by region).')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Model deployments: [{ name, model, version, sku, capacity }], created one at a time.')
param deployments array

@description('Principal id of the Function App identity (Cognitive Services OpenAI User).')
param appPrincipalId string

@description('Public network access. Disabled only together with private endpoints (main.bicep enablePrivateNetworking).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

// Built-in Azure role (id checked in tests/test_infra.py).
var cognitiveServicesOpenAiUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      defaultAction: publicNetworkAccess == 'Enabled' ? 'Allow' : 'Deny'
    }
  }
}

@batchSize(1)
resource modelDeployments 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = [
  for deployment in deployments: {
    parent: account
    name: deployment.name
    sku: {
      name: deployment.sku
      capacity: deployment.capacity
    }
    properties: {
      model: {
        format: 'OpenAI'
        name: deployment.model
        version: deployment.version
      }
    }
  }
]

resource appOpenAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, appPrincipalId, cognitiveServicesOpenAiUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAiUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.endpoint
