"""Ray: Serve deployments that wrap the engine, rank actors, cluster configs, scaling."""
