"""`crosstask eval`: score a running server on unseen BIG-bench tasks, mode by mode.

Every example goes through the public HTTP API with the official `openai` client, exactly
as a user's request would, so the numbers measure the server as deployed (prompt
assembly, retrieval, routing) and not some in-process shortcut. Each evaluated task is
always in `crosstask.exclude_tasks`: the task must be unseen for whatever helps the model.

A mode the server refuses (400 on its first request) is reported as `{"error": ...}` and
the others still run. The heavy imports (openai, rouge-score, matplotlib) happen inside
the functions that need them, so `crosstask --help` and `crosstask serve` do not pay them.

The modules, from the bottom up: `scoring` (how an answer is scored), `modes` (what each
mode sends), `items` (which examples are sent), `config` (what a run is asked to do),
`client` (sending them), `report` (REPORT.json, predictions, plot), `runner` (one whole
evaluation), `console` (stderr). The command line is `serve.cli.eval`.
"""
