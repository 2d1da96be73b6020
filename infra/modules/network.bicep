// Optional private networking (main.bicep enablePrivateNetworking): a virtual network whose
// `app` subnet carries the Function App's outbound traffic (Flex Consumption VNet integration,
// delegated to Microsoft.App/environments), and private endpoints with private DNS zones for
// the data services, whose public network access main.bicep then turns off. The gateway's own
// endpoint stays public (apps call it); see docs/deploy.md for an inbound private endpoint.

@description('Virtual network name.')
param name string

@description('Azure region.')
param location string

@description('Tags for the resources.')
param tags object = {}

@description('Address space of the virtual network.')
param addressPrefix string = '10.20.0.0/16'

@description('Subnet for the Function App VNet integration.')
param appSubnetPrefix string = '10.20.1.0/24'

@description('Subnet for the private endpoints.')
param privateEndpointSubnetPrefix string = '10.20.2.0/24'

@description('Storage account id (blob, queue and table endpoints).')
param storageAccountId string

@description('Cosmos DB account id.')
param cosmosAccountId string

@description('Key Vault id.')
param keyVaultId string

@description('Azure OpenAI account id; empty when the upstream is not deployed here.')
param openAiAccountId string = ''

@description('Azure AI Content Safety account id (main.bicep deployContentSafety), or empty.')
param contentSafetyAccountId string = ''

var storageSuffix = environment().suffixes.storage
var dataLinks = [
  {
    name: 'blob'
    resourceId: storageAccountId
    groupId: 'blob'
    zone: 'privatelink.blob.${storageSuffix}'
  }
  {
    name: 'queue'
    resourceId: storageAccountId
    groupId: 'queue'
    zone: 'privatelink.queue.${storageSuffix}'
  }
  {
    name: 'table'
    resourceId: storageAccountId
    groupId: 'table'
    zone: 'privatelink.table.${storageSuffix}'
  }
  {
    name: 'cosmos'
    resourceId: cosmosAccountId
    groupId: 'Sql'
    zone: 'privatelink.documents.azure.com'
  }
  {
    name: 'vault'
    resourceId: keyVaultId
    groupId: 'vault'
    zone: 'privatelink.vaultcore.azure.net'
  }
]
var openAiLinks = empty(openAiAccountId) ? [] : [{ name: 'openai', resourceId: openAiAccountId, groupId: 'account', zone: 'privatelink.openai.azure.com' }]
var contentSafetyLinks = empty(contentSafetyAccountId) ? [] : [{ name: 'contentsafety', resourceId: contentSafetyAccountId, groupId: 'account', zone: 'privatelink.cognitiveservices.azure.com' }]
var privateLinks = concat(dataLinks, openAiLinks, contentSafetyLinks)

resource vnet 'Microsoft.Network/virtualNetworks@2024-01-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
      {
        name: 'private-endpoints'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          privateEndpointNetworkPolicies: 'Disabled'
        }
      }
    ]
  }
}

resource zones 'Microsoft.Network/privateDnsZones@2020-06-01' = [
  for link in privateLinks: {
    name: link.zone
    location: 'global'
    tags: tags
  }
]

resource zoneLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [
  for (link, i) in privateLinks: {
    parent: zones[i]
    name: '${name}-link'
    location: 'global'
    tags: tags
    properties: {
      virtualNetwork: {
        id: vnet.id
      }
      registrationEnabled: false
    }
  }
]

resource endpoints 'Microsoft.Network/privateEndpoints@2024-01-01' = [
  for link in privateLinks: {
    name: 'pe-${link.name}-${name}'
    location: location
    tags: tags
    properties: {
      subnet: {
        id: '${vnet.id}/subnets/private-endpoints'
      }
      privateLinkServiceConnections: [
        {
          name: link.name
          properties: {
            privateLinkServiceId: link.resourceId
            groupIds: [
              link.groupId
            ]
          }
        }
      ]
    }
  }
]

resource endpointDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-01-01' = [
  for (link, i) in privateLinks: {
    parent: endpoints[i]
    name: 'default'
    properties: {
      privateDnsZoneConfigs: [
        {
          name: link.name
          properties: {
            privateDnsZoneId: zones[i].id
          }
        }
      ]
    }
  }
]

output appSubnetId string = '${vnet.id}/subnets/app'
