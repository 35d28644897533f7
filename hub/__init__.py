"""The local reference backend: agent management and OAuth onboarding wire-compatible with the Agent
Management API v3, firmware releases, installation tasks, signed blob URLs, and the `mers-hub` CLI.

Layout: `home` (the hub directory and its settings), `setup` (what `mers-hub init` creates), `database`
and `models` (SQLAlchemy), `tokens` (the hub's JWTs), `app` (the FastAPI application), one module per
API area, `server` (uvicorn over TLS) and `cli`.
"""
