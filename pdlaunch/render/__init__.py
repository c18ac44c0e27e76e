"""Deployment manifests for cluster managers (`pdlaunch render ...`)."""
