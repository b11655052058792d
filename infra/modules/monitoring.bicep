// Log Analytics and workspace-based Application Insights. Local (instrumentation key)
// authentication is off: the app sends telemetry with its managed identity only.

param location string
param workspaceName string
param appInsightsName string

@description('Days Log Analytics keeps the data.')
@minValue(30)
@maxValue(730)
param retentionInDays int

@description('Principal id of the app\'s user-assigned managed identity.')
param appPrincipalId string

param tags object

// Monitoring Metrics Publisher: what Entra ID-authenticated telemetry ingestion requires.
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      disableLocalAuth: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

resource appTelemetryPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, appPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The connection string names the ingestion endpoint and the resource; it is not a secret
// once local authentication is off (ingestion needs an Entra ID token).
output connectionString string = appInsights.properties.ConnectionString
output name string = appInsights.name
