// The Flex Consumption plan and the function app: Python 3.11 on Linux, the deployment
// package in a blob container reached with the user-assigned identity, and the app settings
// main.bicep composes (this module adds none of its own).

param location string
param planName string
param appName string

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityResourceId string

@description('URL of the blob container that holds the deployment package.')
param deploymentContainerUrl string

@description('Upper bound of instances (Flex Consumption: 1-1000).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int

@description('Memory per instance in MB.')
@allowed([512, 2048, 4096])
param instanceMemoryMB int

@description('Concurrent HTTP invocations one instance takes.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int

@description('Instances kept warm for the HTTP trigger (0 = scale to zero, pay only for use).')
@minValue(0)
param alwaysReadyHttpInstances int

@description('Every app setting of the app, composed by main.bicep.')
param appSettings object

param tags object

// Zero or one entry: keep `alwaysReadyHttpInstances` instances of the HTTP trigger warm.
var alwaysReady = [for i in range(0, min(alwaysReadyHttpInstances, 1)): {
  name: 'http'
  instanceCount: alwaysReadyHttpInstances
}]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy on Flex Consumption needs a region that offers it and zone-redundant storage; it is an operator's choice, not a default that would fail elsewhere.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // No App Service authentication (Easy Auth): it would turn away the Bot Connector; the app
  // validates the channel's signed JWT on every request itself.
  // checkov:skip=CKV_AZURE_17:The Bot Connector presents no client certificate; requests are authenticated by their JWT.
  // checkov:skip=CKV_AZURE_222:The Bot Connector calls the messaging endpoint over the internet, so public network access must stay on.
  // checkov:skip=CKV_AZURE_213:Flex Consumption has no App Service health check; the platform replaces unhealthy instances itself.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales instances itself (maximumInstanceCount); there is no fixed instance count to set.
  name: appName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityResourceId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references (the SingleTenant secret) are resolved with this identity.
    keyVaultReferenceIdentity: identityResourceId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityResourceId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReady
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov reads every sites/config resource as the 'web' configuration; this one is 'appsettings', where these checks do not apply:
  // checkov:skip=CKV_AZURE_13:Not the web configuration (see above); App Service authentication would turn away the Bot Connector (see the site).
  // checkov:skip=CKV_AZURE_63:Not the web configuration; the app logs to Application Insights.
  // checkov:skip=CKV_AZURE_65:Not the web configuration; detailed error pages are off by default.
  // checkov:skip=CKV_AZURE_66:Not the web configuration; failed-request tracing is an IIS feature, absent on Linux.
  // checkov:skip=CKV_AZURE_80:Not the web configuration; the app is Python, not .NET.
  // checkov:skip=CKV_AZURE_88:Not the web configuration; Flex Consumption uses no Azure Files share.
  // checkov:skip=CKV_AZURE_222:Not the web configuration; public access is discussed on the site.
  parent: app
  name: 'appsettings'
  properties: appSettings
}

// Publishing goes through Microsoft Entra ID (az / func with a signed-in account), never
// through basic-auth publishing credentials.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = app.name
output hostName string = app.properties.defaultHostName
