"""Memory-efficient bases: quantized weights that every peftkit method trains on top of (QLoRA and relatives)."""
