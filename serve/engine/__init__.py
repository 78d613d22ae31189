"""The engine package: the only place crosstask imports vLLM.

- types: the vLLM-free dataclasses and errors the rest of crosstask speaks;
- engine: vLLM's async engine behind them; lora_slots: which LoRA id each adapter holds;
- lora_cpu, seeded_sampling, heap_trim: vLLM plugins loaded in each of its processes;
- fusion_processor, fusion_scheduler: logit fusion inside vLLM (the math: routing/fusion).
"""
