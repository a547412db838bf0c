"""Tasks: a registry over reasoning-gym (task references, regeneration, presets) and the verifier."""
