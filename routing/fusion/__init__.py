"""Logit fusion of LoRA specialists inside vLLM's continuous batching (see README, "Fusion").

- spec: what each member request of a fusion group carries in SamplingParams.extra_args;
- logits: the fusion rule (fixed weights, or dynamic per step) on plain tensors;
- processor: the V1 logits processor that fuses each group's rows at every step;
- scheduler: the V1 scheduler that admits a group's members together;
- group: the API-side merge of the members' streams, which checks they stayed in lockstep.
"""
