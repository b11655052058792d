// The storage account behind AzureWebJobsStorage: the Functions host's own blobs (timer
// locks, keys), the deployment package, the bot's conversation references, and the
// proactive queue with its poison queue. Reached only with Microsoft Entra ID: shared keys
// and anonymous blob access are disabled.

@description('Azure region of the account.')
param location string

@description('Storage account name (3-24 lower-case letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param accountName string

@description('Redundancy of the account.')
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_GZRS'])
param skuName string

@description('Blob container Flex Consumption deploys the app package into.')
param deploymentContainerName string

@description('Blob container of conversation references, schedules and proactive bookkeeping (BOT_REFERENCES_CONTAINER).')
param referencesContainerName string

@description('Queue the proactive function listens on (BOT_PROACTIVE_QUEUE); its poison queue is <name>-poison.')
param proactiveQueueName string

@description('Principal id of the app\'s user-assigned managed identity.')
param appPrincipalId string

@description('Optional principal (a producer, an operator) allowed to send to the proactive queue and read delivery reports.')
param producerPrincipalId string

@description('Principal type of producerPrincipalId.')
@allowed(['User', 'Group', 'ServicePrincipal'])
param producerPrincipalType string

param tags object

// Built-in role definition ids (the same in every tenant and cloud).
var roles = {
  // The Functions host reads and writes blobs and creates its own containers
  // (azure-webjobs-hosts for timer schedule status and singleton locks, azure-webjobs-secrets
  // for keys): that needs Owner-level blob data access on the account.
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  // Read, add, update, delete messages; create the queue if missing (queue trigger, the
  // engine's re-enqueues, the poison queue).
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageQueueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
}

var poisonQueueName = '${proactiveQueueName}-poison'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_43:The name is a parameter (checkov cannot evaluate it); main.bicep builds it from lower-case letters and digits within 3-24 characters.
  // checkov:skip=CKV_AZURE_35:Flex Consumption without a virtual network reaches storage over its public endpoint; access is Entra ID only (shared keys off), so the firewall stays open.
  // checkov:skip=CKV_AZURE_59:Same reason as CKV_AZURE_35: public network access is needed without a virtual network; every request needs an Entra ID token.
  // checkov:skip=CKV_AZURE_206:Replication is the skuName parameter (Standard_LRS by default, Standard_ZRS recommended for production); geo-replication is an operator's choice.
  name: accountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource referencesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: referencesContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource proactiveQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: proactiveQueueName
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: poisonQueueName
}

// The host's blob needs (and so the deployment package and the references container) are
// account-wide: it creates containers of its own, which a container-scoped role cannot allow.
resource appBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, appPrincipalId, roles.storageBlobDataOwner)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Queues: only the two the app uses. The queue trigger peeks, receives and deletes; the engine
// re-enqueues copies into the same queue and writes the poison queue itself.
resource appProactiveQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(proactiveQueue.id, appPrincipalId, roles.storageQueueDataContributor)
  scope: proactiveQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appPoisonQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(poisonQueue.id, appPrincipalId, roles.storageQueueDataContributor)
  scope: poisonQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// A producer only adds messages to the proactive queue and reads delivery reports.
resource producerSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(producerPrincipalId)) {
  name: guid(proactiveQueue.id, producerPrincipalId, roles.storageQueueDataMessageSender)
  scope: proactiveQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: producerPrincipalId
    principalType: producerPrincipalType
  }
}

// What a producer reads of the references container, and nothing else of it: stored
// conversations (refs/), delivery reports (proactive/) and schedules (schedules/); never
// the bot's state (state/) or its user index (users/). Blobs by path, listings by prefix
// (a listing without one, of the whole container, is refused). tools/infra_check.py
// holds this to the prefixes the producer reads.
var producerReadCondition = '((!(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read\'} AND NOT SubOperationMatches{\'Blob.List\'})) OR (@Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringStartsWith \'refs/\' OR @Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringStartsWith \'proactive/\' OR @Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringStartsWith \'schedules/\')) AND ((!(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read\'} AND SubOperationMatches{\'Blob.List\'})) OR (@Request[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:prefix] StringStartsWith \'refs/\' OR @Request[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:prefix] StringStartsWith \'proactive/\' OR @Request[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:prefix] StringStartsWith \'schedules/\'))'

resource producerReportReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(producerPrincipalId)) {
  name: guid(referencesContainer.id, producerPrincipalId, roles.storageBlobDataReader)
  scope: referencesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
    principalId: producerPrincipalId
    principalType: producerPrincipalType
    condition: producerReadCondition
    conditionVersion: '2.0'
  }
}

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output deploymentContainerUrl string = '${account.properties.primaryEndpoints.blob}${deploymentContainer.name}'
output referencesContainerName string = referencesContainer.name
output proactiveQueueName string = proactiveQueue.name
output poisonQueueName string = poisonQueue.name
