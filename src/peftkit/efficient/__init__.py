"""Memory-efficient bases: quantized weights that every peftkit method trains on top of (QLoRA and relatives); and
leaner adapters: AdapterDrop (`adapter_drop`), SparseAdapter pruning (`sparse_adapter`)."""
