// Key Vault for the SingleTenant client secret. The vault holds only the bot's secret, so
// read access to it is granted on the vault (a secret that does not exist yet cannot be a
// role assignment's scope). The secret itself is never a template parameter: the operator
// sets it with `az keyvault secret set`, so it stays out of deployment history.

param location string
param vaultName string

@description('Principal id of the app\'s user-assigned managed identity (reads the secret).')
param appPrincipalId string

@description('Optional principal allowed to set and rotate the secret (Key Vault Secrets Officer).')
param secretsOfficerPrincipalId string

@allowed(['User', 'Group', 'ServicePrincipal'])
param secretsOfficerPrincipalType string

param tags object

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109:App Service resolves Key Vault references over the vault's public endpoint when the app has no virtual network; access is Entra ID RBAC only.
  // checkov:skip=CKV_AZURE_189:Same reason as CKV_AZURE_109: public network access is needed to resolve the reference without a virtual network.
  name: vaultName
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
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
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

resource operatorSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(secretsOfficerPrincipalId)) {
  name: guid(vault.id, secretsOfficerPrincipalId, keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficer)
    principalId: secretsOfficerPrincipalId
    principalType: secretsOfficerPrincipalType
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
