"""Architecture knowledge: reference key lists, detection, block maps, LoRA key mapping."""
