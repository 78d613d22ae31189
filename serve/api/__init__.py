"""The HTTP API: FastAPI routers, one folder a resource (api_router, protocol, serving)."""
