// Entry point for the Azure Developer CLI (`azd up`, see azure.yaml): creates the resource group
// and deploys main.bicep into it. `az deployment group create` uses main.bicep directly.

targetScope = 'subscription'

@description('azd environment name; names the resource group and tags every resource.')
@minLength(1)
@maxLength(64)
param environmentName string

@description('Azure region (azd asks for it).')
@minLength(1)
param location string

@description('Client id of the gateway app registration (azd env set SEKISHO_GATEWAY_CLIENT_ID <id>).')
param gatewayClientId string

@description('Object id of the signed-in user (azd sets AZURE_PRINCIPAL_ID): made an operator.')
param principalId string = ''

@description('Resource group name; empty: rg-<environmentName>.')
param resourceGroupName string = ''

var tags = {
  'azd-env-name': environmentName
}

resource rg 'Microsoft.Resources/resourceGroups@2024-07-01' = {
  name: empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

module sekisho 'main.bicep' = {
  name: 'sekisho'
  scope: rg
  params: {
    location: location
    tags: tags
    gatewayClientId: gatewayClientId
    operatorPrincipalIds: empty(principalId) ? [] : [principalId]
  }
}

output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = rg.name
output SEKISHO_FUNCTION_APP_NAME string = sekisho.outputs.functionAppName
output SEKISHO_GATEWAY_URL string = sekisho.outputs.gatewayUrl
output SEKISHO_COSMOS_ENDPOINT string = sekisho.outputs.cosmosEndpoint
output SEKISHO_COSMOS_DATABASE string = sekisho.outputs.cosmosDatabaseName
