"""What operators see: Prometheus metric families per role (worker, trainer) and the HTTP endpoints
(/metrics, health) both roles serve."""
