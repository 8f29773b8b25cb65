"""llava-sculpt: fine-tune LLaVA-1.5 on a downstream task without forgetting (LoRASculpt, CVPR 2025)."""

__version__ = "0.1.0"
