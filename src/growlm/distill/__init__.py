"""Distillation: students cut from teachers and the objectives that teach them."""
