"""Where tokens are cut: vision side (before the LLM), decoder layers, and signal capture."""
