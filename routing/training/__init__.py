"""LoRA adapter training with PEFT on the CPU, in the prompt format the server uses.

One recipe (routing/library/recipe.json for the default library) fixes everything:

- `recipe`: the settings, recipe.json, and the fingerprints that make a rerun resume.
- `data`: which examples each task trains on, their prompts (with retrieved cross-task
  demonstrations, as the server builds them) as token ids, and their batches.
- `loop`: training one LoRA, with checkpoints so a killed run ends with the same weights.
- `library`: training and saving every adapter of a recipe, the specialists' grouping.

`crosstask adapters train` (serve/cli/adapters.py) is the command line to it.
"""
