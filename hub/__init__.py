"""The local reference backend (to come): agent management and OAuth onboarding wire-compatible with the
Agent Management API v3, firmware releases, installation tasks, signed blob URLs, and the `mers-hub` CLI."""
