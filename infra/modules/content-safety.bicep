// Azure AI Content Safety for apps whose policy turns content_safety on (main.bicep
// deployContentSafety). Local (key) auth is off: the gateway calls it with the Function App
// identity, which holds "Cognitive Services User" on the account.

@description('Account name; also its custom subdomain (<name>.cognitiveservices.azure.com), globally unique.')
@minLength(2)
@maxLength(64)
param name string

@description('Azure region of the account (Prompt Shields and the harm categories are not offered in every region).')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Principal id of the Function App identity (Cognitive Services User).')
param appPrincipalId string

@description('Public network access. Disabled only together with private endpoints (main.bicep enablePrivateNetworking).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

// Built-in Azure role (id checked in tests/test_infra.py).
var cognitiveServicesUser = 'a97b65f3-24c7-4388-baec-2e87135dc908'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'ContentSafety'
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

resource appContentSafetyUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, appPrincipalId, cognitiveServicesUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.endpoint
