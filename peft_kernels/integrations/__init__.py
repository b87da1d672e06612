"""Adapters to other libraries (HF PEFT, transformers, bitsandbytes), imported lazily: importing
peft_kernels never imports them."""
