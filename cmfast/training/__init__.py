"""Training: EDM teachers, consistency distillation and consistency training (REFERENCE.md sections 4-6)."""
