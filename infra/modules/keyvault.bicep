// Key Vault (RBAC permission model) for upstream api-keys of backends that cannot use Entra ID
// (backend `auth: key_vault` in the deployment catalogue, shared/upstream/backends.py). The Function App
// identity may read secrets; operators may be granted the right to write them.

@description('Key Vault name (3-24 letters, digits and hyphens, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags for the resource.')
param tags object = {}

@description('Principal id of the Function App identity (Key Vault Secrets User).')
param appPrincipalId string

@description('Object ids of operators (users or groups) who store upstream keys (Key Vault Secrets Officer).')
param operatorPrincipalIds array = []

@description('Purge protection: a deleted vault and its secrets stay recoverable for the retention period (cannot be turned off again).')
param enablePurgeProtection bool = true

@description('Public network access. Disabled only together with private endpoints (main.bicep enablePrivateNetworking).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

// Built-in Azure roles (ids checked in tests/test_infra.py).
var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: enablePurgeProtection ? true : null
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: publicNetworkAccess == 'Enabled' ? 'Allow' : 'Deny'
    }
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource operatorSecretsOfficers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for operatorId in operatorPrincipalIds: {
    name: guid(vault.id, operatorId, keyVaultSecretsOfficer)
    scope: vault
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficer)
      principalId: operatorId
    }
  }
]

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
