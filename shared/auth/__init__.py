"""Authentication: inbound JWT validation (`inbound`, `keys`) and outbound tokens (`tokens`).

Kept empty on purpose: importing `shared.auth` must not pull in PyJWT, aiohttp or MSAL.
"""
