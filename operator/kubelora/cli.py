"""kubelora command line."""
