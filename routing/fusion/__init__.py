"""Logit fusion of LoRA specialists: the parts free of vLLM (docs/fusion.md).

- spec: what each member request of a fusion group carries in SamplingParams.extra_args;
- logits: the fusion rule (fixed weights, or dynamic per step) on plain tensors;
- group: the API-side merge of the members' streams, which checks they stayed in lockstep.

The logits processor and the scheduler that run them inside vLLM live with the engine
(serve/engine/fusion_processor.py, serve/engine/fusion_scheduler.py).
"""
