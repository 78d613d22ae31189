"""/v1 completion resource."""
