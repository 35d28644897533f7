"""The device's side of mers: the cloud client (onboarding, credentials and their renewal, access tokens,
the installation-task client) and the `mers` CLI; the A/B installer builds on it (issue 7).

The public surface is `mers.client.DeviceClient` (open it with `DeviceClient.open(board)`); every error
it raises is a `mers.errors.MersError`. Everything the device keeps lives in the board's state directory
(see `mers.credentials`), written atomically and 0600.
"""
