"""/v1 chat_completion resource."""
