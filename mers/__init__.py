"""The installer on the device (to come): onboarding client, token cache, installation-task client,
signed-URL downloader, the A/B installer state machine with confirm and rollback, and the `mers` CLI and
daemon."""
