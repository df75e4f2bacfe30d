"""Interoperability with PEFT and transformers: hand a qosora model over, and bring a PEFT adapter in.

    options      ConvertOptions, the options of `qosora convert` (no torch import: `--help` stays fast)
    peft_format  a PEFT LoRA adapter directory: write one, read one
    bnb_base     the NF4 residual model in transformers' own bitsandbytes 4-bit serialization
    lora_delta   the trained adapter as a LoRA against the original weights (B A - B0 A0), exact or truncated
    peft_out     `convert`: DIR -> base + adapter (`--to peft`), or DIR -> a LoRA for the original model (`--to lora`)
    peft_in      `qosora prepare MODEL --from-peft ADAPTER`: a PEFT LoRA / PiSSA adapter as qosora factors
"""
