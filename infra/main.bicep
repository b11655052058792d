// Everything the bot needs in one resource group: a user-assigned managed identity, storage
// (Entra ID only), Log Analytics + Application Insights, a Flex Consumption function app,
// the Azure Bot with its Teams channel and, for SingleTenant, a Key Vault for the secret.
// The README's "Deploy" section walks through it; every parameter is described below.

targetScope = 'resourceGroup'

// ---- Naming and placement ----

@description('Region of every resource except the bot registration (global). Must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Lower-case letters and digits (3-11) that start every resource name.')
@minLength(3)
@maxLength(11)
param namePrefix string

@description('Tags put on every resource.')
param tags object = {}

// ---- The bot's identity ----

@description('How the bot gets its Connector token: UserAssignedMSI (the managed identity, no secret) or SingleTenant (an app registration whose client secret is kept in Key Vault).')
@allowed(['UserAssignedMSI', 'SingleTenant'])
param botAppType string = 'UserAssignedMSI'

@description('SingleTenant only: the app registration\'s application (client) id.')
param botAppId string = ''

@description('SingleTenant only: name of the Key Vault secret holding the client secret.')
param botSecretName string = 'bot-app-password'

@description('SingleTenant only, optional: object id of a user, group or service principal allowed to set and rotate the secret.')
param secretsOfficerPrincipalId string = ''

@description('Principal type of secretsOfficerPrincipalId.')
@allowed(['User', 'Group', 'ServicePrincipal'])
param secretsOfficerPrincipalType string = 'User'

@description('Name shown for the bot in Teams and the Azure portal.')
param botDisplayName string = 'Echo bot'

@description('Azure Bot pricing tier (F0: free, standard channels such as Teams are unmetered).')
@allowed(['F0', 'S1'])
param botSku string = 'F0'

// ---- Bot settings (the app settings of the README's Configuration table) ----

@description('BOT_CHANNEL_SERVICE: public or usgov; selects every cloud URL the bot uses.')
@allowed(['public', 'usgov'])
param channelService string = 'public'

@description('BOT_OPENID_METADATA_URL: channel OpenID metadata; empty = the cloud\'s default.')
param openIdMetadataUrl string = ''

@description('BOT_EMULATOR_OPENID_METADATA_URL: Emulator / Entra ID OpenID metadata; empty = the cloud\'s default.')
param emulatorOpenIdMetadataUrl string = ''

@description('BOT_LOGIN_AUTHORITY: authority host for outbound tokens; empty = the cloud\'s default.')
param loginAuthority string = ''

@description('BOT_TRUSTED_SERVICE_URLS: extra serviceUrl prefixes the bot may send its token to, comma-separated; empty = Bot Framework and Teams hosts only.')
param trustedServiceUrls string = ''

@description('BOT_REFERENCES_CONTAINER: blob container of conversation references, schedules and delivery reports.')
param referencesContainer string = 'conversation-references'

@description('BOT_PROACTIVE_QUEUE: queue of proactive send requests; its poison queue is <name>-poison, so at most 56 characters (queue names have 3-63).')
@minLength(3)
@maxLength(56)
param proactiveQueue string = 'proactive-messages'

@description('BOT_SCHEDULE: NCRONTAB (UTC; 6 fields, or 5 without seconds) of the timer that enqueues due schedules. Flex Consumption runs no TimeSpan.')
param schedule string = '0 * * * * *'

@description('BOT_MAX_BODY_BYTES: largest request body POST /api/messages accepts.')
@minValue(1)
param maxBodyBytes int = 1048576

@description('BOT_CONNECTOR_RATE_LIMIT: Teams requests per second per app and tenant, all instances together (where each instance\'s adaptive rate starts).')
param connectorRateLimit string = '50'

@description('BOT_PROACTIVE_MAX_AGE_SECONDS: how long a throttled or transiently failing proactive send is requeued before it is reported failed.')
param proactiveMaxAgeSeconds string = '3600'

@description('BOT_PROACTIVE_CLAIM_SECONDS: how long an instance holds a proactive target; a crashed instance\'s targets are retried after it. At least 40 (a send starts only while 30 s of it are left, for the send with its retries and the write that settles it) and at most 3600: the app refuses others at startup.')
param proactiveClaimSeconds string = '45'

@description('App settings of your own, added to the template\'s: PYTHON_ENABLE_DEBUG_LOGGING, a queue option (AzureFunctionsJobHost__extensions__queues__...), AzureWebJobs.proactive_function.Disabled while upgrading. Every provisioning sets the app\'s settings to exactly the template\'s and these: one set by hand is removed. Names the template sets, or that must not be set on Azure, are refused by tools/infra_check.py.')
param extraAppSettings object = {}

// ---- Producers ----

@description('Optional object id of a producer (user, group or service principal) allowed to enqueue proactive requests and read delivery reports.')
param producerPrincipalId string = ''

@description('Principal type of producerPrincipalId.')
@allowed(['User', 'Group', 'ServicePrincipal'])
param producerPrincipalType string = 'ServicePrincipal'

// ---- Scale ----

// The handlers are async and spend their time waiting on the Connector and storage, so one
// instance serves many requests at once (the Python default on Flex is 1).
@description('Concurrent HTTP invocations per instance.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16

// Teams allows about 50 requests per second per app and tenant (BOT_CONNECTOR_RATE_LIMIT):
// each instance's rate per tenant adapts to 429s, so instances together settle near it;
// more instances only help until the sum reaches it. 40 keeps bursts and broadcasts fast.
@description('Upper bound of instances.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

// CPU grows with memory on Flex; 2048 MB keeps JWT signature checks and cold start quick
// while the app itself needs far less.
@description('Memory per instance in MB.')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@description('Instances kept warm for /api/messages (0 = scale to zero; 1 avoids cold starts on the first message, at a cost).')
@minValue(0)
@maxValue(10)
param alwaysReadyHttpInstances int = 0

@description('Storage redundancy (Standard_ZRS recommended for production where the region offers it).')
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_GZRS'])
param storageSku string = 'Standard_LRS'

@description('Days Log Analytics keeps logs.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

// ---- Names ----

var suffix = take(uniqueString(resourceGroup().id, namePrefix), 8)
var singleTenant = botAppType == 'SingleTenant'
// An Azure Bot's app id cannot be changed once it is registered, so the registration's name
// follows the bot's identity: switching to SingleTenant (or to another app registration)
// creates a new registration instead of failing to update the old one.
var botIdentity = singleTenant ? botAppId : 'UserAssignedMSI'
var botSuffix = take(uniqueString(resourceGroup().id, namePrefix, botIdentity), 8)
var names = {
  identity: 'id-${namePrefix}-${suffix}'
  storage: 'st${namePrefix}${suffix}'
  workspace: 'log-${namePrefix}-${suffix}'
  appInsights: 'appi-${namePrefix}-${suffix}'
  plan: 'plan-${namePrefix}-${suffix}'
  app: 'func-${namePrefix}-${suffix}'
  bot: 'bot-${namePrefix}-${botSuffix}'
  vault: 'kv-${namePrefix}-${suffix}'
}
var deploymentContainer = 'app-package'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.identity
  location: location
  tags: tags
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    accountName: names.storage
    skuName: storageSku
    deploymentContainerName: deploymentContainer
    referencesContainerName: referencesContainer
    proactiveQueueName: proactiveQueue
    appPrincipalId: identity.properties.principalId
    producerPrincipalId: producerPrincipalId
    producerPrincipalType: producerPrincipalType
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    workspaceName: names.workspace
    appInsightsName: names.appInsights
    retentionInDays: logRetentionDays
    appPrincipalId: identity.properties.principalId
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = if (singleTenant) {
  name: 'keyVault'
  params: {
    location: location
    vaultName: names.vault
    appPrincipalId: identity.properties.principalId
    secretsOfficerPrincipalId: secretsOfficerPrincipalId
    secretsOfficerPrincipalType: secretsOfficerPrincipalType
    tags: tags
  }
}

// The app id the bot authenticates as: the managed identity, or the app registration.
var appId = singleTenant ? botAppId : identity.properties.clientId

// Every app setting of the app. The bot's settings are exactly what shared/config.py reads
// (tools/infra_check.py holds them to it, in make test); the rest are the host's.
var hostSettings = {
  // Host storage and the bot's own storage: identity-based, no connection string.
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  // Telemetry with the identity (local authentication is off on Application Insights).
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
}
var botSettings = {
  MicrosoftAppType: botAppType
  MicrosoftAppId: appId
  MicrosoftAppTenantId: tenant().tenantId
  BOT_CHANNEL_SERVICE: channelService
  BOT_OPENID_METADATA_URL: openIdMetadataUrl
  BOT_EMULATOR_OPENID_METADATA_URL: emulatorOpenIdMetadataUrl
  BOT_LOGIN_AUTHORITY: loginAuthority
  BOT_TRUSTED_SERVICE_URLS: trustedServiceUrls
  BOT_REFERENCES_CONTAINER: storage.outputs.referencesContainerName
  BOT_PROACTIVE_QUEUE: storage.outputs.proactiveQueueName
  BOT_SCHEDULE: schedule
  BOT_MAX_BODY_BYTES: string(maxBodyBytes)
  BOT_CONNECTOR_RATE_LIMIT: connectorRateLimit
  BOT_PROACTIVE_MAX_AGE_SECONDS: proactiveMaxAgeSeconds
  BOT_PROACTIVE_CLAIM_SECONDS: proactiveClaimSeconds
}
// SingleTenant: App Service resolves the reference with the identity; a reference without a
// secret version follows rotation.
var secretSettings = singleTenant ? {
  MicrosoftAppPassword: '@Microsoft.KeyVault(VaultName=${names.vault};SecretName=${botSecretName})'
} : {}
var appSettings = union(extraAppSettings, hostSettings, botSettings, secretSettings)

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionApp'
  dependsOn: [
    keyVault
  ]
  params: {
    location: location
    planName: names.plan
    appName: names.app
    identityResourceId: identity.id
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReadyHttpInstances: alwaysReadyHttpInstances
    appSettings: appSettings
    tags: tags
  }
}

module bot 'modules/bot.bicep' = {
  name: 'bot'
  params: {
    botName: names.bot
    displayName: botDisplayName
    sku: botSku
    appType: botAppType
    appId: appId
    identityResourceId: identity.id
    endpoint: 'https://${functionApp.outputs.hostName}/api/messages'
    tags: tags
  }
}

// Names and ids only: nothing here is a secret.
output functionAppName string = functionApp.outputs.name
output functionAppHostName string = functionApp.outputs.hostName
output messagingEndpoint string = 'https://${functionApp.outputs.hostName}/api/messages'
output botName string = bot.outputs.name
output botAppId string = appId
output identityClientId string = identity.properties.clientId
output storageAccountName string = storage.outputs.name
output blobEndpoint string = storage.outputs.blobEndpoint
output queueEndpoint string = storage.outputs.queueEndpoint
output proactiveQueue string = storage.outputs.proactiveQueueName
output keyVaultName string = singleTenant ? names.vault : ''
