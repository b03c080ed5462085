"""The offline demo and what it is made of: synthetic dashcam clips and tiny Qwen-VL models (also the tests' fixtures)."""
