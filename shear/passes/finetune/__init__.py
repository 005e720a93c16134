"""Fine-tuning recovery beyond LoRAShear's own: EBFT block-wise reconstruction."""
