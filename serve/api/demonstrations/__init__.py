"""/v1/demonstrations: add to and search the demonstration store."""
