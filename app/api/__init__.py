"""HTTP only: the /v1 and /v2 routes, health and docs, request schemas, wire forms, API key and limits."""
