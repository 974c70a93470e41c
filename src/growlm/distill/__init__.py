"""Distillation: objectives, students cut from teachers, and cached teacher targets."""
