"""fcot: Fine-tune-CoT (Ho, Schmid, Yun, ACL 2023) on Ray."""

__version__ = "0.1.0"
