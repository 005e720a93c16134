"""LoRAShear's passes: saliency, knowledge distribution, LHSPG, dynamic recovery."""
