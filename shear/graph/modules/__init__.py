"""Per-module facts: composed operators (peft LoRA), norms, attribute rules, in one table."""
