"""Local development environment: a real control plane (kwokctl, binary runtime) and MinIO."""
