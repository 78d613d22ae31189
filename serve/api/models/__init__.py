"""/v1 models resource."""
