"""Host integration: one module per host library (mlx-lm, mlx-vlm), each patch checking its host first."""
