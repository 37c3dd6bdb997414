"""Carrying a teacher's add-ons (ControlNet, LoRA, IP-Adapter) over to a student through the block map."""
