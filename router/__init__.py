"""OpenAI-compatible HTTP API, session pinning and the Redis session store."""
