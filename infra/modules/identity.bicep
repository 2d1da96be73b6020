// The user-assigned managed identity the Function App runs as. Every data-plane grant in the
// other modules (storage, Cosmos DB, Key Vault, Azure OpenAI, Application Insights) is given to
// this one principal, so the app holds no keys at all.

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region.')
param location string

@description('Tags for the resource.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
