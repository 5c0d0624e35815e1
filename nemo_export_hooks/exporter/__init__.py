"""Megatron-Core -> Hugging Face exporter (see ``api.export_to_hf``)."""
