// The Azure Bot registration: the messaging endpoint, the bot's identity, and the Microsoft
// Teams channel.

param botName string
param displayName string

@allowed(['F0', 'S1'])
param sku string

@allowed(['UserAssignedMSI', 'SingleTenant'])
param appType string

@description('The bot\'s app id: the managed identity\'s client id (UserAssignedMSI) or the app registration\'s client id (SingleTenant).')
param appId string

@description('Resource id of the user-assigned identity (UserAssignedMSI only).')
param identityResourceId string

@description('https URL of the messages function.')
param endpoint string

param tags object

resource bot 'Microsoft.BotService/botServices@2022-09-15' = {
  name: botName
  location: 'global'
  tags: tags
  kind: 'azurebot'
  sku: {
    name: sku
  }
  properties: {
    displayName: displayName
    endpoint: endpoint
    msaAppType: appType
    msaAppId: appId
    msaAppTenantId: tenant().tenantId
    msaAppMSIResourceId: appType == 'UserAssignedMSI' ? identityResourceId : null
    // No Direct Line / Web Chat secrets: the bot is reached through channels only.
    disableLocalAuth: true
  }
}

resource teams 'Microsoft.BotService/botServices/channels@2022-09-15' = {
  parent: bot
  name: 'MsTeamsChannel'
  location: 'global'
  properties: {
    channelName: 'MsTeamsChannel'
    properties: {
      isEnabled: true
    }
  }
}

output name string = bot.name
